//! The versioned object store: every object of every kind as JSON, one global
//! `resourceVersion` counter, a history of changes for watches that resume from a
//! `resourceVersion`, and the feeds that push each change to watches and to the emulator's
//! own controllers.
//!
//! All access goes through [`Store::txn`], which holds one lock for the whole closure. That
//! makes each API call (with its cascades: foreground deletion, garbage collection) atomic,
//! and it makes the order in which feeds receive changes the order of `resourceVersion`s,
//! which is what lets a watch resume without gaps. The closures never await.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::kind::Kind;
use crate::meta;

/// What happened to an object, as a watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One committed change.
#[derive(Debug)]
pub(crate) struct Change {
    /// The `resourceVersion` the change was committed at.
    pub rv: u64,
    pub kind: Kind,
    pub change: ChangeType,
    /// The object after the change; for a deletion, its last state stamped with the
    /// deletion's `resourceVersion` (as the apiserver sends it).
    pub object: Value,
    /// The object before the change (`None` for an addition).
    pub previous: Option<Value>,
    at: Instant,
}

/// What a feed receives.
#[derive(Debug)]
pub(crate) enum Delivery {
    Change(Arc<Change>),
    /// The emulator was told to drop every watch ([`crate::Emulator::drop_watches`]).
    Dropped,
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// From now, with a snapshot of the current objects.
    Now,
    /// From just after this `resourceVersion`, replaying the history.
    After(u64),
}

/// A registered feed: the starting point and the receiver of later changes.
pub(crate) struct Subscription {
    /// Current objects of the kinds, for [`Start::Now`].
    pub snapshot: Vec<Value>,
    /// Changes after the requested `resourceVersion`, for [`Start::After`].
    pub replay: Vec<Arc<Change>>,
    /// The `resourceVersion` when the feed was registered.
    pub rv: u64,
    pub rx: mpsc::UnboundedReceiver<Delivery>,
}

type Key = (Kind, String, String);

struct Subscriber {
    kinds: Vec<Kind>,
    /// Watches served to clients (dropped by `drop_watches`), as opposed to the emulator's
    /// own controllers.
    external: bool,
    tx: mpsc::UnboundedSender<Delivery>,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Where each uid is, so owners are found without a scan.
    by_uid: HashMap<String, Key>,
    /// The objects that name each uid in an owner reference (the garbage collector's graph).
    dependents: HashMap<String, BTreeSet<Key>>,
    history: VecDeque<Arc<Change>>,
    /// Changes at or before this `resourceVersion` are gone from the history.
    compacted: u64,
    subscribers: Vec<Subscriber>,
}

/// The store. Shared by everything in an emulator.
pub(crate) struct Store {
    inner: Mutex<Inner>,
    window: Option<Duration>,
}

impl Store {
    /// An empty store whose history keeps changes for `window` (`None`: until
    /// [`Store::compact`]).
    pub fn new(window: Option<Duration>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                by_uid: HashMap::new(),
                dependents: HashMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                subscribers: Vec::new(),
            }),
            window,
        }
    }

    /// Runs `f` with the store locked.
    pub fn txn<R>(&self, f: impl FnOnce(&mut Txn<'_>) -> R) -> R {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut txn = Txn {
            inner,
            window: self.window,
        };
        f(&mut txn)
    }

    /// Registers a feed for changes to `kinds` (all kinds when empty). A start older than the
    /// compacted history is answered with 410 Expired, worded as the watch cache words it.
    pub fn subscribe(
        &self,
        kinds: &[Kind],
        start: Start,
        external: bool,
    ) -> Result<Subscription, ApiError> {
        self.txn(|t| {
            let wanted = |k: Kind| kinds.is_empty() || kinds.contains(&k);
            let inner = &mut t.inner;
            let (snapshot, replay) = match start {
                Start::Now => {
                    let snapshot = inner
                        .objects
                        .iter()
                        .filter(|((k, _, _), _)| wanted(*k))
                        .map(|(_, v)| v.clone())
                        .collect();
                    (snapshot, Vec::new())
                }
                Start::After(rv) => {
                    if rv < inner.compacted {
                        return Err(ApiError::expired(format!(
                            "too old resource version: {rv} ({})",
                            inner.compacted
                        )));
                    }
                    let replay = inner
                        .history
                        .iter()
                        .filter(|c| c.rv > rv && wanted(c.kind))
                        .cloned()
                        .collect();
                    (Vec::new(), replay)
                }
            };
            let (tx, rx) = mpsc::unbounded_channel();
            inner.subscribers.push(Subscriber {
                kinds: kinds.to_vec(),
                external,
                tx,
            });
            Ok(Subscription {
                snapshot,
                replay,
                rv: inner.rv,
                rx,
            })
        })
    }

    /// Forgets the history: a watch from any `resourceVersion` handed out before gets 410
    /// Gone. The version moves on by one so that even a client that is up to date has to
    /// list again (what a test of the 410 path needs); lists answer with the new version.
    pub fn compact(&self) {
        self.txn(|t| {
            t.bump();
            t.inner.compacted = t.inner.rv;
            t.inner.history.clear();
        });
    }

    /// Ends every client watch.
    pub fn drop_external_feeds(&self) {
        self.txn(|t| {
            t.inner.subscribers.retain(|s| {
                if s.external {
                    let _ = s.tx.send(Delivery::Dropped);
                }
                !s.external
            });
        });
    }

    /// The current `resourceVersion`.
    pub fn rv(&self) -> u64 {
        self.txn(|t| t.rv())
    }
}

/// The store, locked.
pub(crate) struct Txn<'a> {
    inner: MutexGuard<'a, Inner>,
    window: Option<Duration>,
}

impl Txn<'_> {
    /// The current `resourceVersion`.
    pub fn rv(&self) -> u64 {
        self.inner.rv
    }

    /// An object by kind, namespace (empty for cluster-scoped kinds) and name.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Value> {
        self.inner
            .objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
    }

    /// Objects of a kind, in one namespace or all, ordered by namespace then name (the order
    /// etcd keys give the real apiserver's lists).
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Value> {
        self.iter(kind, namespace).cloned().collect()
    }

    /// Like [`Txn::list`], without copying.
    pub fn iter<'a>(
        &'a self,
        kind: Kind,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        let from = (
            kind,
            namespace.unwrap_or_default().to_owned(),
            String::new(),
        );
        self.inner
            .objects
            .range(from..)
            .take_while(move |((k, ns, _), _)| *k == kind && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v)
    }

    /// Stores a new object (metadata already filled in) at a new `resourceVersion`.
    pub fn insert(&mut self, kind: Kind, mut obj: Value) -> Result<Value, ApiError> {
        let key = key_of(kind, &obj);
        if self.inner.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &key.2));
        }
        let rv = self.bump();
        meta::metadata_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.index(&key, None, Some(&obj));
        self.inner.objects.insert(key, obj.clone());
        self.emit(rv, kind, ChangeType::Added, obj.clone(), None);
        Ok(obj)
    }

    /// Replaces a stored object. A write that changes nothing keeps the `resourceVersion` and
    /// sends no event, as the apiserver skips no-op updates.
    pub fn put(&mut self, kind: Kind, mut obj: Value) -> Result<Value, ApiError> {
        let key = key_of(kind, &obj);
        let Some(old) = self.inner.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(kind, &key.2));
        };
        let old_rv = meta::meta_str(&old, "resourceVersion").unwrap_or_default();
        meta::metadata_mut(&mut obj).insert("resourceVersion".into(), json!(old_rv));
        if obj == old {
            return Ok(old);
        }
        let rv = self.bump();
        meta::metadata_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.index(&key, Some(&old), Some(&obj));
        self.inner.objects.insert(key, obj.clone());
        self.emit(rv, kind, ChangeType::Modified, obj.clone(), Some(old));
        Ok(obj)
    }

    /// Removes an object; its last state, stamped with the deletion's `resourceVersion`.
    pub fn remove(&mut self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let old = self.inner.objects.remove(&key)?;
        self.index(&key, Some(&old), None);
        let rv = self.bump();
        let mut last = old.clone();
        meta::metadata_mut(&mut last).insert("resourceVersion".into(), json!(rv.to_string()));
        self.emit(rv, kind, ChangeType::Deleted, last.clone(), Some(old));
        Some(last)
    }

    /// The object with this uid.
    pub fn by_uid(&self, uid: &str) -> Option<(Kind, &Value)> {
        let key = self.inner.by_uid.get(uid)?;
        Some((key.0, self.inner.objects.get(key)?))
    }

    /// The objects with an owner reference to `owner_uid`.
    pub fn dependents(&self, owner_uid: &str) -> Vec<(Kind, Value)> {
        self.inner
            .dependents
            .get(owner_uid)
            .into_iter()
            .flatten()
            .filter_map(|key| Some((key.0, self.inner.objects.get(key)?.clone())))
            .collect()
    }

    /// Keeps the uid and owner indexes in step with a write.
    fn index(&mut self, key: &Key, old: Option<&Value>, new: Option<&Value>) {
        let inner = &mut *self.inner;
        if let Some(old) = old {
            inner.by_uid.remove(meta::uid(old));
            for (owner, _) in meta::owner_uids(old) {
                if let Some(set) = inner.dependents.get_mut(&owner) {
                    set.remove(key);
                    if set.is_empty() {
                        inner.dependents.remove(&owner);
                    }
                }
            }
        }
        if let Some(new) = new {
            inner.by_uid.insert(meta::uid(new).to_owned(), key.clone());
            for (owner, _) in meta::owner_uids(new) {
                inner
                    .dependents
                    .entry(owner)
                    .or_default()
                    .insert(key.clone());
            }
        }
    }

    fn bump(&mut self) -> u64 {
        self.inner.rv += 1;
        self.inner.rv
    }

    fn emit(
        &mut self,
        rv: u64,
        kind: Kind,
        change: ChangeType,
        object: Value,
        previous: Option<Value>,
    ) {
        let now = Instant::now();
        let change = Arc::new(Change {
            rv,
            kind,
            change,
            object,
            previous,
            at: now,
        });
        let inner = &mut *self.inner;
        inner.history.push_back(change.clone());
        if let Some(window) = self.window {
            while let Some(front) = inner.history.front() {
                if now.duration_since(front.at) <= window {
                    break;
                }
                inner.compacted = front.rv;
                inner.history.pop_front();
            }
        }
        inner.subscribers.retain(|s| {
            if !s.kinds.is_empty() && !s.kinds.contains(&kind) {
                return true;
            }
            // A closed receiver is a watch that ended; forget it.
            s.tx.send(Delivery::Change(change.clone())).is_ok()
        });
    }
}

fn key_of(kind: Kind, obj: &Value) -> Key {
    (
        kind,
        meta::namespace(obj).to_owned(),
        meta::name(obj).to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "default"}})
    }

    #[tokio::test]
    async fn versions_increase_and_no_op_writes_are_skipped() {
        let store = Store::new(None);
        let a = store.txn(|t| t.insert(Kind::Pod, pod("a"))).unwrap();
        let rv_a = meta::resource_version(&a);
        let again = store.txn(|t| t.put(Kind::Pod, a.clone())).unwrap();
        assert_eq!(meta::resource_version(&again), rv_a);
        let mut changed = a.clone();
        changed["spec"] = json!({"x": 1});
        let b = store.txn(|t| t.put(Kind::Pod, changed)).unwrap();
        assert!(meta::resource_version(&b) > rv_a);
        assert!(store.txn(|t| t.insert(Kind::Pod, pod("a"))).is_err());
    }

    #[tokio::test]
    async fn resume_replays_and_compaction_expires() {
        let store = Store::new(None);
        let a = store.txn(|t| t.insert(Kind::Pod, pod("a"))).unwrap();
        store.txn(|t| t.insert(Kind::Pod, pod("b"))).unwrap();
        let sub = store
            .subscribe(&[Kind::Pod], Start::After(meta::resource_version(&a)), true)
            .unwrap();
        assert_eq!(sub.replay.len(), 1);
        assert_eq!(meta::name(&sub.replay[0].object), "b");
        store.compact();
        let err = store
            .subscribe(&[Kind::Pod], Start::After(meta::resource_version(&a)), true)
            .err()
            .unwrap();
        assert_eq!(err.code, 410);
        assert!(err.message.starts_with("too old resource version"));
        // Resuming from the compaction point itself loses nothing, so it is allowed.
        assert!(store
            .subscribe(&[Kind::Pod], Start::After(store.rv()), true)
            .is_ok());
    }
}
