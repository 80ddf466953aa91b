//! The garbage collector, run synchronously inside the transaction that removes an object:
//! dependents of a removed owner are deleted (or orphaned), and an owner held by the
//! `foregroundDeletion` finalizer is released once its blocking dependents are gone.

use serde_json::Value;

use crate::apiserver::{self, DeleteOptions, PropagationPolicy, FOREGROUND_FINALIZER};
use crate::kind::Kind;
use crate::meta;
use crate::store::Txn;

/// Objects in `namespace` with an owner reference to `owner_uid` (owner references only
/// reach within a namespace, or from a namespaced object to a cluster-scoped one).
pub(crate) fn dependents(t: &Txn<'_>, namespace: &str, owner_uid: &str) -> Vec<(Kind, Value)> {
    t.dependents(owner_uid)
        .into_iter()
        .filter(|(_, d)| namespace.is_empty() || meta::namespace(d) == namespace)
        .collect()
}

/// The object with this uid, in `namespace` or cluster-scoped.
fn find_uid(t: &Txn<'_>, namespace: &str, uid: &str) -> Option<(Kind, Value)> {
    let (kind, obj) = t.by_uid(uid)?;
    (!kind.namespaced() || meta::namespace(obj) == namespace).then(|| (kind, obj.clone()))
}

/// Removes the owner references to `owner` from its dependents (the Orphan policy).
pub(crate) fn orphan_dependents(t: &mut Txn<'_>, owner: &Value) {
    let uid = meta::uid(owner).to_owned();
    for (kind, mut dep) in dependents(t, meta::namespace(owner), &uid) {
        meta::remove_owner(&mut dep, &uid);
        let _ = t.put(kind, dep);
    }
}

/// After `removed` left the store: its dependents go (unless another owner still exists,
/// in which case only the reference goes), and an owner waiting on it in the foreground is
/// released when nothing blocks it any more.
pub(crate) fn on_removed(t: &mut Txn<'_>, _kind: Kind, removed: &Value) {
    let uid = meta::uid(removed).to_owned();
    let namespace = meta::namespace(removed).to_owned();
    let background = DeleteOptions {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteOptions::default()
    };
    for (dep_kind, mut dep) in dependents(t, &namespace, &uid) {
        let other_owner = meta::owner_uids(&dep)
            .iter()
            .any(|(o, _)| *o != uid && find_uid(t, meta::namespace(&dep), o).is_some());
        if other_owner {
            meta::remove_owner(&mut dep, &uid);
            let _ = t.put(dep_kind, dep);
        } else {
            let _ = apiserver::delete(
                t,
                dep_kind,
                meta::namespace(&dep),
                meta::name(&dep),
                &background,
            );
        }
    }
    for (owner_uid, _) in meta::owner_uids(removed) {
        if let Some((owner_kind, owner)) = find_uid(t, &namespace, &owner_uid) {
            let (ns, name) = (
                meta::namespace(&owner).to_owned(),
                meta::name(&owner).to_owned(),
            );
            release_foreground_owner(t, owner_kind, &ns, &name);
        }
    }
}

/// Drops the `foregroundDeletion` finalizer of an owner being deleted in the foreground once
/// no dependent with `blockOwnerDeletion` remains, and removes the owner when no other
/// finalizer holds it.
pub(crate) fn release_foreground_owner(t: &mut Txn<'_>, kind: Kind, namespace: &str, name: &str) {
    let Some(owner) = t.get(kind, namespace, name).cloned() else {
        return;
    };
    if !meta::is_terminating(&owner)
        || !meta::finalizers(&owner)
            .iter()
            .any(|f| f == FOREGROUND_FINALIZER)
    {
        return;
    }
    let uid = meta::uid(&owner).to_owned();
    let blocked = dependents(t, namespace, &uid).iter().any(|(_, d)| {
        meta::owner_uids(d)
            .iter()
            .any(|(o, blocks)| *o == uid && *blocks)
    });
    if blocked {
        return;
    }
    let mut released = owner;
    meta::remove_finalizer(&mut released, FOREGROUND_FINALIZER);
    let done = meta::finalizers(&released).is_empty();
    let _ = t.put(kind, released);
    if done {
        if let Some(last) = t.remove(kind, namespace, name) {
            on_removed(t, kind, &last);
        }
    }
}

/// A dependent created while its owner is being deleted, or after its owner is gone, is
/// collected at once (the real collector would get to it moments later).
pub(crate) fn check_new_dependent(t: &mut Txn<'_>, kind: Kind, obj: &Value) {
    let owners = meta::owner_uids(obj);
    if owners.is_empty() {
        return;
    }
    let namespace = meta::namespace(obj).to_owned();
    let orphaned = owners
        .iter()
        .all(|(uid, _)| match find_uid(t, &namespace, uid) {
            None => true,
            Some((_, owner)) => {
                meta::is_terminating(&owner)
                    && meta::finalizers(&owner)
                        .iter()
                        .any(|f| f == FOREGROUND_FINALIZER)
            }
        });
    if orphaned {
        let opts = DeleteOptions {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteOptions::default()
        };
        let _ = apiserver::delete(t, kind, &namespace, meta::name(obj), &opts);
    }
}
