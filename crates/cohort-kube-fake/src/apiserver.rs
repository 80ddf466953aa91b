//! The apiserver's write semantics on top of the store: create (with `generateName`, system
//! metadata, admission), replace and patch (with `resourceVersion` preconditions and the
//! `status` subresource), and delete (grace periods, finalizers, propagation policies).
//! Every function runs inside one store transaction.

use serde_json::{json, Map, Value};

use crate::admission;
use crate::error::ApiError;
use crate::gc;
use crate::kind::Kind;
use crate::meta;
use crate::store::Txn;

/// The finalizer that holds an owner until its blocking dependents are gone.
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// What happens to an object's dependents when it is deleted (`propagationPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropagationPolicy {
    /// Dependents are kept, their owner references removed.
    Orphan,
    /// The object goes at once; the garbage collector deletes the dependents after.
    Background,
    /// The object stays (with `deletionTimestamp` and the `foregroundDeletion` finalizer)
    /// until its dependents are gone.
    Foreground,
}

impl PropagationPolicy {
    /// Parses the API's spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Orphan" => Some(Self::Orphan),
            "Background" => Some(Self::Background),
            "Foreground" => Some(Self::Foreground),
            _ => None,
        }
    }
}

/// `DeleteOptions`, from the query string or the request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    /// `gracePeriodSeconds`. For pods, the time the kubelet gives containers between SIGTERM
    /// and SIGKILL (default: the pod's `terminationGracePeriodSeconds`). On a Job deleted in
    /// the foreground it is passed on to the Job's pods (see the crate docs).
    pub grace_period_seconds: Option<i64>,
    /// `propagationPolicy`; absent means Orphan for Jobs (as `batch/v1` defines it) and
    /// Background for everything else.
    pub propagation_policy: Option<PropagationPolicy>,
    /// `preconditions.uid`.
    pub precondition_uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub precondition_resource_version: Option<String>,
}

/// The outcome of a delete.
#[derive(Debug, Clone)]
pub(crate) enum Deleted {
    /// The object is gone; its last state.
    Removed(Value),
    /// The object is being deleted (grace period, finalizers); its current state.
    Pending(Value),
}

/// How a patch body is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchType {
    /// RFC 7386 merge patch; strategic merge patches are treated as merge patches.
    Merge,
    /// RFC 6902 JSON patch.
    Json,
}

/// Creates an object in `namespace` (ignored for cluster-scoped kinds).
pub(crate) fn create(
    t: &mut Txn<'_>,
    kind: Kind,
    namespace: &str,
    obj: Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    if kind == Kind::CustomResourceDefinition {
        return Err(ApiError::method_not_supported(kind, "create"));
    }
    let Value::Object(mut body) = obj else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    check_type(kind, &body)?;
    let mut metadata = match body.remove("metadata") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(ApiError::bad_request("metadata must be an object")),
    };
    if kind.namespaced() {
        let given = metadata
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !given.is_empty() && given != namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        match t.get(Kind::Namespace, "", namespace) {
            None => return Err(ApiError::namespace_not_found(namespace)),
            Some(ns) if meta::is_terminating(ns) => {
                return Err(ApiError::new(403, "Forbidden", format!("{} \"{}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated", kind.qualified(), metadata.get("name").and_then(Value::as_str).unwrap_or_default()), None))
            }
            Some(_) => {}
        }
        metadata.insert("namespace".into(), json!(namespace));
    } else {
        metadata.remove("namespace");
    }
    for system in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "selfLink",
        "managedFields",
    ] {
        metadata.remove(system);
    }
    let given_name = metadata
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let generate = metadata
        .get("generateName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let ns_key = if kind.namespaced() { namespace } else { "" };
    let name = match (given_name, generate) {
        (Some(n), _) => n,
        (None, Some(base)) => {
            // Kubernetes keeps generated names within 63 characters.
            let base: String = base.chars().take(58).collect();
            let mut name = format!("{base}{}", meta::random_suffix());
            for _ in 0..8 {
                if t.get(kind, ns_key, &name).is_none() {
                    break;
                }
                name = format!("{base}{}", meta::random_suffix());
            }
            name
        }
        (None, None) => String::new(),
    };
    metadata.insert("name".into(), json!(name));
    metadata.insert("uid".into(), json!(meta::new_uid()));
    metadata.insert("generation".into(), json!(1));
    metadata.insert("creationTimestamp".into(), json!(meta::now()));
    let mut obj = assemble(kind, metadata, body);
    admission::prepare_create(kind, &mut obj);
    admission::validate(kind, &obj)?;
    if dry_run {
        return Ok(obj);
    }
    let stored = t.insert(kind, obj)?;
    gc::check_new_dependent(t, kind, &stored);
    Ok(stored)
}

/// Replaces an object (`PUT`), or only its status (`PUT …/status`).
pub(crate) fn replace(
    t: &mut Txn<'_>,
    kind: Kind,
    namespace: &str,
    name: &str,
    mut body: Value,
    status_only: bool,
) -> Result<Value, ApiError> {
    let existing = t
        .get(kind, namespace, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(kind, name))?;
    let Some(map) = body.as_object() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    check_type(kind, map)?;
    let body_name = meta::name(&body);
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let wanted_rv = meta::meta_str(&body, "resourceVersion").unwrap_or_default();
    if !wanted_rv.is_empty() && Some(wanted_rv) != meta::meta_str(&existing, "resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    meta::metadata_mut(&mut body);
    let updated = updated_object(kind, &existing, body, status_only);
    commit(t, kind, updated)
}

/// Patches an object (`PATCH`), or only its status.
pub(crate) fn patch(
    t: &mut Txn<'_>,
    kind: Kind,
    namespace: &str,
    name: &str,
    patch_type: PatchType,
    patch: &Value,
    status_only: bool,
) -> Result<Value, ApiError> {
    let existing = t
        .get(kind, namespace, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(kind, name))?;
    let mut doc = existing.clone();
    match patch_type {
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            json_patch::merge(&mut doc, patch);
        }
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                    None,
                )
            })?;
        }
    }
    if meta::meta_str(&doc, "resourceVersion") != meta::meta_str(&existing, "resourceVersion") {
        return Err(ApiError::conflict(kind, name));
    }
    meta::metadata_mut(&mut doc);
    let updated = updated_object(kind, &existing, doc, status_only);
    commit(t, kind, updated)
}

/// Deletes an object with the given options.
pub(crate) fn delete(
    t: &mut Txn<'_>,
    kind: Kind,
    namespace: &str,
    name: &str,
    opts: &DeleteOptions,
) -> Result<Deleted, ApiError> {
    if kind == Kind::CustomResourceDefinition {
        return Err(ApiError::method_not_supported(kind, "delete"));
    }
    let existing = t
        .get(kind, namespace, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(kind, name))?;
    if let Some(uid) = &opts.precondition_uid {
        if uid != meta::uid(&existing) {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    kind.qualified(),
                    meta::uid(&existing)
                ),
                None,
            ));
        }
    }
    if let Some(rv) = &opts.precondition_resource_version {
        if Some(rv.as_str()) != meta::meta_str(&existing, "resourceVersion") {
            return Err(ApiError::conflict(kind, name));
        }
    }
    match kind {
        Kind::Namespace => return Ok(delete_namespace(t, existing)),
        Kind::Pod => return Ok(delete_pod(t, existing, opts.grace_period_seconds)),
        _ => {}
    }
    if meta::is_terminating(&existing) {
        return Ok(Deleted::Pending(existing));
    }
    let policy = opts.propagation_policy.unwrap_or(match kind {
        // batch/v1 Jobs default to orphaning their pods (`DefaultGarbageCollectionPolicy`).
        Kind::Job => PropagationPolicy::Orphan,
        _ => PropagationPolicy::Background,
    });
    match policy {
        PropagationPolicy::Orphan => {
            gc::orphan_dependents(t, &existing);
            Ok(remove_or_mark(t, kind, existing))
        }
        PropagationPolicy::Background => Ok(remove_or_mark(t, kind, existing)),
        PropagationPolicy::Foreground => {
            let mut marked = existing;
            let m = meta::metadata_mut(&mut marked);
            m.insert("deletionTimestamp".into(), json!(meta::now()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            let finalizers = m.entry("finalizers").or_insert(json!([]));
            if let Some(list) = finalizers.as_array_mut() {
                if !list.iter().any(|f| f == FOREGROUND_FINALIZER) {
                    list.push(json!(FOREGROUND_FINALIZER));
                }
            }
            let marked = t.put(kind, marked)?;
            let dependent_opts = DeleteOptions {
                grace_period_seconds: opts.grace_period_seconds,
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteOptions::default()
            };
            for (dep_kind, dep) in gc::dependents(t, namespace, meta::uid(&marked)) {
                let _ = delete(
                    t,
                    dep_kind,
                    meta::namespace(&dep),
                    meta::name(&dep),
                    &dependent_opts,
                );
            }
            gc::release_foreground_owner(t, kind, namespace, name);
            Ok(match t.get(kind, namespace, name) {
                Some(still) => Deleted::Pending(still.clone()),
                None => Deleted::Removed(marked),
            })
        }
    }
}

/// The kubelet is done with a terminating pod (its containers are stopped): the pod goes,
/// unless finalizers hold it.
pub(crate) fn finish_pod_deletion(t: &mut Txn<'_>, namespace: &str, name: &str) -> Option<Value> {
    let pod = t.get(Kind::Pod, namespace, name)?;
    if !meta::is_terminating(pod) || !meta::finalizers(pod).is_empty() {
        return None;
    }
    let last = t.remove(Kind::Pod, namespace, name)?;
    gc::on_removed(t, Kind::Pod, &last);
    Some(last)
}

/// A pod goes at once when it never ran on a node, has finished, or the grace period is 0;
/// otherwise it gets `deletionTimestamp` and the kubelet stops it and finishes the deletion.
fn delete_pod(t: &mut Txn<'_>, pod: Value, grace: Option<i64>) -> Deleted {
    let grace = grace
        .or_else(|| {
            pod.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30)
        .max(0);
    let scheduled = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("");
    let terminal = matches!(phase, "Succeeded" | "Failed");
    if grace == 0 || !scheduled || terminal {
        return remove_or_mark(t, Kind::Pod, pod);
    }
    let deadline = chrono::Utc::now() + chrono::Duration::seconds(grace);
    if let Some(current) = meta::meta_str(&pod, "deletionTimestamp").and_then(meta::parse_timestamp)
    {
        // A second delete may only shorten the grace period.
        if current <= deadline {
            return Deleted::Pending(pod);
        }
    }
    let mut marked = pod;
    let m = meta::metadata_mut(&mut marked);
    m.insert("deletionTimestamp".into(), json!(meta::timestamp(deadline)));
    m.insert("deletionGracePeriodSeconds".into(), json!(grace));
    match t.put(Kind::Pod, marked) {
        Ok(stored) => Deleted::Pending(stored),
        Err(_) => unreachable!("the pod was read in this transaction"),
    }
}

/// Removes an object now, or, when finalizers hold it, marks it as being deleted.
fn remove_or_mark(t: &mut Txn<'_>, kind: Kind, obj: Value) -> Deleted {
    if !meta::finalizers(&obj).is_empty() {
        let mut marked = obj;
        let m = meta::metadata_mut(&mut marked);
        m.entry("deletionTimestamp").or_insert(json!(meta::now()));
        m.entry("deletionGracePeriodSeconds").or_insert(json!(0));
        let stored = t.put(kind, marked).expect("read in this transaction");
        return Deleted::Pending(stored);
    }
    match t.remove(kind, meta::namespace(&obj), meta::name(&obj)) {
        Some(last) => {
            gc::on_removed(t, kind, &last);
            Deleted::Removed(last)
        }
        None => Deleted::Removed(obj),
    }
}

/// A namespace takes everything in it along (at once: the emulator has no namespace
/// controller to wait for).
fn delete_namespace(t: &mut Txn<'_>, ns: Value) -> Deleted {
    let name = meta::name(&ns).to_owned();
    let force = DeleteOptions {
        grace_period_seconds: Some(0),
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteOptions::default()
    };
    for kind in Kind::ALL.into_iter().filter(|k| k.namespaced()) {
        for obj in t.list(kind, Some(&name)) {
            let _ = delete(t, kind, &name, meta::name(&obj), &force);
            // Finalizers cannot hold anything back here.
            if let Some(last) = t.remove(kind, &name, meta::name(&obj)) {
                gc::on_removed(t, kind, &last);
            }
        }
    }
    match t.remove(Kind::Namespace, "", &name) {
        Some(last) => Deleted::Removed(last),
        None => Deleted::Removed(ns),
    }
}

/// The stored object after a write of `body`: system metadata and (for kinds with a status
/// subresource) the status are kept from `existing`; a changed spec bumps `generation`.
fn updated_object(kind: Kind, existing: &Value, body: Value, status_only: bool) -> Value {
    if status_only {
        let mut new = existing.clone();
        new["status"] = body.get("status").cloned().unwrap_or(json!({}));
        return new;
    }
    let Value::Object(mut body) = body else {
        return existing.clone();
    };
    let mut metadata = match body.remove("metadata") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let old_meta = existing.get("metadata").and_then(Value::as_object);
    for system in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "resourceVersion",
    ] {
        match old_meta.and_then(|m| m.get(system)) {
            Some(v) => metadata.insert(system.into(), v.clone()),
            None => metadata.remove(system),
        };
    }
    if kind.has_status() {
        match existing.get("status") {
            Some(s) => body.insert("status".into(), s.clone()),
            None => body.remove("status"),
        };
    }
    if kind == Kind::Job {
        // The generated selector is immutable; clients that replace a Job often omit it.
        if let (Some(sel), Some(spec)) = (
            existing.pointer("/spec/selector"),
            body.get_mut("spec").and_then(Value::as_object_mut),
        ) {
            spec.insert("selector".into(), sel.clone());
        }
    }
    if body.get("spec") != existing.get("spec") {
        let generation = existing
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        metadata.insert("generation".into(), json!(generation + 1));
    }
    let mut new = assemble(kind, metadata, body);
    admission::prepare_update(kind, &mut new);
    new
}

/// Validates and stores an update; an object being deleted whose last finalizer is gone is
/// removed (pods are left to the kubelet, which finishes their deletion).
fn commit(t: &mut Txn<'_>, kind: Kind, obj: Value) -> Result<Value, ApiError> {
    admission::validate(kind, &obj)?;
    let stored = t.put(kind, obj)?;
    let releasable = meta::is_terminating(&stored) && meta::finalizers(&stored).is_empty();
    let pod_done = kind != Kind::Pod
        || matches!(
            stored.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
    if releasable && pod_done {
        if let Some(last) = t.remove(kind, meta::namespace(&stored), meta::name(&stored)) {
            gc::on_removed(t, kind, &last);
            return Ok(last);
        }
    }
    Ok(stored)
}

/// Rejects a body whose `apiVersion` or `kind` names another resource.
fn check_type(kind: Kind, body: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(v) = body.get("apiVersion").and_then(Value::as_str) {
        if v != kind.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                kind.api_version()
            )));
        }
    }
    if let Some(k) = body.get("kind").and_then(Value::as_str) {
        if k != kind.name() {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                kind.name()
            )));
        }
    }
    Ok(())
}

/// `apiVersion`, `kind`, `metadata` (in the apiserver's key order), then the rest.
fn assemble(kind: Kind, metadata: Map<String, Value>, mut body: Map<String, Value>) -> Value {
    body.remove("apiVersion");
    body.remove("kind");
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(kind.api_version()));
    obj.insert("kind".into(), json!(kind.name()));
    obj.insert("metadata".into(), Value::Object(ordered_metadata(metadata)));
    obj.extend(body);
    Value::Object(obj)
}

fn ordered_metadata(mut m: Map<String, Value>) -> Map<String, Value> {
    const ORDER: [&str; 13] = [
        "name",
        "generateName",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
    ];
    let mut out = Map::new();
    for k in ORDER {
        if let Some(v) = m.remove(k) {
            out.insert(k.into(), v);
        }
    }
    out.extend(m);
    out
}
