//! Reading and writing `metadata` on objects held as JSON, and the values the apiserver
//! generates: uids, names from `generateName`, timestamps.

use serde_json::{json, Map, Value};

/// The alphabet Kubernetes draws generated name suffixes from (no vowels, so no words, and
/// no look-alike characters): `k8s.io/apimachinery/pkg/util/rand`.
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Five characters from Kubernetes' alphabet, the suffix `generateName` and the Job
/// controller's pod names get.
pub fn random_suffix() -> String {
    // A v4 uuid is 122 random bits; five of its bytes are plenty for a name suffix.
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    bytes[..5]
        .iter()
        .map(|b| NAME_ALPHABET[usize::from(*b) % NAME_ALPHABET.len()] as char)
        .collect()
}

/// A new `metadata.uid`.
pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Now, as the apiserver writes timestamps: RFC 3339, whole seconds, `Z`.
pub fn now() -> String {
    timestamp(chrono::Utc::now())
}

/// A time as the apiserver writes it.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Reads a timestamp written by [`timestamp`] (or any RFC 3339 time).
pub fn parse_timestamp(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// `metadata`, created when missing (the object must be a JSON object).
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    object_mut(obj, "metadata")
}

/// The object at `key`, created (or replaced, if not an object) when needed.
pub fn object_mut<'a>(obj: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let map = obj.as_object_mut().expect("an object");
    let slot = map.entry(key).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().expect("an object")
}

/// A string in `metadata`.
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// `metadata.name` (empty if missing).
pub fn name(obj: &Value) -> &str {
    meta_str(obj, "name").unwrap_or_default()
}

/// `metadata.namespace` (empty if missing).
pub fn namespace(obj: &Value) -> &str {
    meta_str(obj, "namespace").unwrap_or_default()
}

/// `metadata.uid` (empty if missing).
pub fn uid(obj: &Value) -> &str {
    meta_str(obj, "uid").unwrap_or_default()
}

/// `metadata.labels`.
pub fn labels(obj: &Value) -> Option<&Value> {
    obj.get("metadata")?.get("labels")
}

/// Whether the object is being deleted (`metadata.deletionTimestamp` is set).
pub fn is_terminating(obj: &Value) -> bool {
    meta_str(obj, "deletionTimestamp").is_some()
}

/// `metadata.finalizers`.
pub fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Removes one finalizer; the `finalizers` key goes when the list is empty, as the apiserver
/// omits empty lists.
pub fn remove_finalizer(obj: &mut Value, finalizer: &str) {
    let meta = metadata_mut(obj);
    if let Some(Value::Array(list)) = meta.get_mut("finalizers") {
        list.retain(|f| f.as_str() != Some(finalizer));
        if list.is_empty() {
            meta.remove("finalizers");
        }
    }
}

/// The uids in `metadata.ownerReferences`, with whether each blocks the owner's foreground
/// deletion.
pub fn owner_uids(obj: &Value) -> Vec<(String, bool)> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| {
                    let uid = r.get("uid")?.as_str()?.to_owned();
                    let blocks = r.get("blockOwnerDeletion").and_then(Value::as_bool) == Some(true);
                    Some((uid, blocks))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The owner reference marked `controller: true` of the given kind: (name, uid).
pub fn controller_of<'a>(obj: &'a Value, kind: &str) -> Option<(&'a str, &'a str)> {
    obj.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| {
            r.get("controller").and_then(Value::as_bool) == Some(true)
                && r.get("kind").and_then(Value::as_str) == Some(kind)
        })
        .and_then(|r| Some((r.get("name")?.as_str()?, r.get("uid")?.as_str()?)))
}

/// Drops the owner reference to `uid` (what the garbage collector does to orphans).
pub fn remove_owner(obj: &mut Value, uid: &str) {
    let meta = metadata_mut(obj);
    if let Some(Value::Array(refs)) = meta.get_mut("ownerReferences") {
        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
        if refs.is_empty() {
            meta.remove("ownerReferences");
        }
    }
}

/// `metadata.resourceVersion` as a number (0 if missing or not a number).
#[cfg(test)]
pub fn resource_version(obj: &Value) -> u64 {
    meta_str(obj, "resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_use_the_kubernetes_alphabet() {
        for _ in 0..100 {
            let s = random_suffix();
            assert_eq!(s.len(), 5);
            assert!(s.bytes().all(|b| NAME_ALPHABET.contains(&b)), "{s}");
        }
    }

    #[test]
    fn timestamps_are_whole_seconds_in_utc() {
        let t = now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z'));
        assert!(parse_timestamp(&t).is_some());
    }
}
