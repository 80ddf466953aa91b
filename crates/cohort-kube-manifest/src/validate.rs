//! The manifest check of `prefect_kubernetes/worker.py:
//! KubernetesWorkerJobConfiguration._validate_job_manifest`.
//!
//! Prefect fills in `metadata` (with `annotations`, `labels` and `namespace`), then computes a
//! JSON Patch from the manifest to its base Job with `jsonpatch.JsonPatch.from_diff` (jsonpatch
//! 1.47) and reports the patch's `add` operations as missing attributes, or else its `replace`
//! operations as incompatible values. The report is therefore whatever the diff algorithm
//! says, quirks included, and this module follows that algorithm (`jsonpatch.py: DiffBuilder`)
//! where it can change the report:
//!
//! * a value removed from the manifest that equals a value the base adds turns both into a
//!   `move`: a manifest without `parallelism` but with `spec.backoffLimit: 1` passes, and so does
//!   one without `restartPolicy` but with a label whose value is `Never`;
//! * `containers` is diffed as a list: when any container is exactly `{"name": "prefect-job"}`
//!   the others are just removed and the manifest passes (env, image and args then go into the
//!   first container, whatever it is); otherwise the first container is compared with it, so a
//!   realistic sidecar in front fails with `/spec/template/spec/containers/0/name`.
//!
//! Only lists of the base document are compared as lists, and the base has one: `containers`,
//! of one item. The list diff below handles a one-item target exactly; it would need
//! jsonpatch's sequence matching for longer ones.

use std::collections::HashMap;

use cohort_template::python_repr;
use serde_json::{json, Value};

use crate::error::ManifestError;
use crate::Map;

/// The part of Prefect's model validation that touches the manifest: adds the `metadata` keys
/// Prefect adds (`namespace` from the configuration's), then checks it against the base Job.
pub(crate) fn validate_manifest(manifest: &mut Map, namespace: &str) -> Result<(), ManifestError> {
    let metadata = manifest
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(metadata) = metadata else {
        return Err(ManifestError::manifest("`metadata` must be an object"));
    };
    for key in ["annotations", "labels"] {
        metadata
            .entry(key)
            .or_insert_with(|| Value::Object(Map::new()));
    }
    metadata
        .entry("namespace")
        .or_insert_with(|| Value::String(namespace.to_owned()));

    let (missing, incompatible) = diff_against_base(manifest);
    if !missing.is_empty() {
        return Err(ManifestError::MissingAttributes(missing));
    }
    if !incompatible.is_empty() {
        return Err(ManifestError::IncompatibleValues(incompatible));
    }
    Ok(())
}

/// `prefect_kubernetes/worker.py: _get_base_job_manifest`.
fn base_manifest() -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"annotations": {}, "labels": {}},
        "spec": {
            "template": {
                "spec": {
                    "parallelism": 1,
                    "completions": 1,
                    "restartPolicy": "Never",
                    "containers": [{"name": "prefect-job"}],
                }
            }
        },
    })
}

/// The sorted paths of the patch's `add` operations, and the sorted `<path> must have value
/// <repr>` of its `replace` operations.
fn diff_against_base(manifest: &Map) -> (Vec<String>, Vec<String>) {
    let mut diff = Diff::default();
    let base = base_manifest();
    diff.compare_values(&[], None, &Value::Object(manifest.clone()), &base);
    let mut missing = Vec::new();
    let mut incompatible = Vec::new();
    for op in diff.execute() {
        match op.kind {
            Kind::Add => missing.push(pointer(&op.path)),
            Kind::Replace => incompatible.push(format!(
                "{} must have value {}",
                pointer(&op.path),
                python_repr(op.value.as_ref().expect("a replace has a value"))
            )),
            Kind::Remove | Kind::Move => {}
        }
    }
    missing.sort();
    incompatible.sort();
    (missing, incompatible)
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Add,
    Remove,
    Replace,
    Move,
}

#[derive(Debug, Clone)]
struct Op {
    kind: Kind,
    path: Vec<Part>,
    value: Option<Value>,
    live: bool,
}

/// jsonpatch's `DiffBuilder`: operations in insertion order (a `move` found later cancels an
/// earlier `add` or `remove`), and the removed and added values by their JSON, most recent
/// last, for finding moves.
#[derive(Default)]
struct Diff {
    ops: Vec<Op>,
    removed: HashMap<String, Vec<usize>>,
    added: HashMap<String, Vec<usize>>,
}

impl Diff {
    fn compare_values(&mut self, path: &[Part], key: Option<Part>, src: &Value, dst: &Value) {
        let at = join(path, key.clone());
        match (src, dst) {
            (Value::Object(src), Value::Object(dst)) => self.compare_dicts(&at, src, dst),
            (Value::Array(src), Value::Array(dst)) => self.compare_lists(&at, src, dst),
            // Scalars are equal when their JSON is: `1` and `1.0`, `1` and `true` differ.
            _ if dumps(src) == dumps(dst) => {}
            _ => {
                self.push(Kind::Replace, at, Some(dst.clone()));
            }
        }
    }

    fn compare_dicts(&mut self, path: &[Part], src: &Map, dst: &Map) {
        for (key, value) in src.iter().filter(|(key, _)| !dst.contains_key(*key)) {
            self.item_removed(path, Part::Key(key.clone()), value);
        }
        for (key, value) in dst.iter().filter(|(key, _)| !src.contains_key(*key)) {
            self.item_added(path, Part::Key(key.clone()), value);
        }
        for (key, value) in src.iter() {
            if let Some(target) = dst.get(key) {
                self.compare_values(path, Some(Part::Key(key.clone())), value, target);
            }
        }
    }

    /// `DiffBuilder._compare_lists` over the runs of `_differing_runs`.
    fn compare_lists(&mut self, path: &[Part], src: &[Value], dst: &[Value]) {
        for (i1, i2, j1, j2) in differing_runs(src, dst) {
            let paired = (i2 - i1).min(j2 - j1);
            for k in j1..j1 + paired {
                let (old, new) = (&src[i1 + k - j1], &dst[k]);
                match (old, new) {
                    (Value::Object(old), Value::Object(new)) => {
                        self.compare_dicts(&join(path, Some(Part::Index(k))), old, new)
                    }
                    (Value::Array(old), Value::Array(new)) => {
                        self.compare_lists(&join(path, Some(Part::Index(k))), old, new)
                    }
                    _ if dumps(old) == dumps(new) => {}
                    _ => {
                        self.item_removed(path, Part::Index(k), old);
                        self.item_added(path, Part::Index(k), new);
                    }
                }
            }
            for old in &src[i1 + paired..i2] {
                self.item_removed(path, Part::Index(j1 + paired), old);
            }
            for (k, new) in dst.iter().enumerate().take(j2).skip(j1 + paired) {
                self.item_added(path, Part::Index(k), new);
            }
        }
    }

    fn item_added(&mut self, path: &[Part], key: Part, item: &Value) {
        let target = join(path, Some(key));
        if let Some(index) = take(&mut self.removed, item) {
            let source = self.ops[index].path.clone();
            // A value cannot move into its own children.
            if !is_inside(&target, &source) {
                self.ops[index].live = false;
                if source != target {
                    self.push(Kind::Move, target, None);
                }
                return;
            }
        }
        let index = self.push(Kind::Add, target, Some(item.clone()));
        self.added.entry(move_key(item)).or_default().push(index);
    }

    fn item_removed(&mut self, path: &[Part], key: Part, item: &Value) {
        let source = join(path, Some(key));
        if let Some(index) = take(&mut self.added, item) {
            let added = self.ops[index].path.clone();
            self.ops[index].live = false;
            if without_item(&source, &added) != added {
                self.push(Kind::Move, added, None);
            }
            return;
        }
        let index = self.push(Kind::Remove, source, None);
        self.removed.entry(move_key(item)).or_default().push(index);
    }

    fn push(&mut self, kind: Kind, path: Vec<Part>, value: Option<Value>) -> usize {
        self.ops.push(Op {
            kind,
            path,
            value,
            live: true,
        });
        self.ops.len() - 1
    }

    /// `DiffBuilder.execute`: the live operations, a `remove` directly followed by an `add` at
    /// the same path merged into a `replace`.
    fn execute(self) -> Vec<Op> {
        let live: Vec<Op> = self.ops.into_iter().filter(|op| op.live).collect();
        let mut out = Vec::with_capacity(live.len());
        let mut i = 0;
        while i < live.len() {
            if let [first, second, ..] = &live[i..] {
                if first.kind == Kind::Remove
                    && second.kind == Kind::Add
                    && first.path == second.path
                {
                    out.push(Op {
                        kind: Kind::Replace,
                        ..second.clone()
                    });
                    i += 2;
                    continue;
                }
            }
            out.push(live[i].clone());
            i += 1;
        }
        out
    }
}

/// `_differing_runs` for a target of at most one item (the base's `containers`): the runs
/// `(i1, i2, j1, j2)` of `src[i1..i2]` replaced by `dst[j1..j2]` between the common start and
/// end. With one target item left in the middle, Python's `SequenceMatcher` pairs it with its
/// first exact equal in `src` (everything else is removed), or else replaces the whole middle
/// with it, which is also the by-position run.
fn differing_runs(src: &[Value], dst: &[Value]) -> Vec<(usize, usize, usize, usize)> {
    let src_keys: Vec<String> = src.iter().map(move_key).collect();
    let dst_keys: Vec<String> = dst.iter().map(move_key).collect();
    let shorter = src.len().min(dst.len());
    let mut start = 0;
    while start < shorter && src_keys[start] == dst_keys[start] {
        start += 1;
    }
    let mut common_end = 0;
    while common_end < shorter - start
        && src_keys[src.len() - 1 - common_end] == dst_keys[dst.len() - 1 - common_end]
    {
        common_end += 1;
    }
    let (src_end, dst_end) = (src.len() - common_end, dst.len() - common_end);
    let middle = &src_keys[start..src_end];
    match &dst_keys[start..dst_end] {
        [] if middle.is_empty() => vec![],
        [] => vec![(start, src_end, start, dst_end)],
        [only] => match middle.iter().position(|key| key == only) {
            Some(i) => {
                let mut runs = Vec::new();
                if i > 0 {
                    runs.push((start, start + i, start, start));
                }
                if start + i + 1 < src_end {
                    runs.push((start + i + 1, src_end, start + 1, start + 1));
                }
                runs
            }
            None => vec![(start, src_end, start, dst_end)],
        },
        // Not reachable with Prefect's base Job; by position, as jsonpatch falls back to.
        _ => vec![(start, src_end, start, dst_end)],
    }
}

/// The most recent stored operation for a value equal to `item`, taken out.
fn take(storage: &mut HashMap<String, Vec<usize>>, item: &Value) -> Option<usize> {
    storage.get_mut(&move_key(item))?.pop()
}

fn join(path: &[Part], key: Option<Part>) -> Vec<Part> {
    let mut out = path.to_vec();
    out.extend(key);
    out
}

fn is_inside(parts: &[Part], container: &[Part]) -> bool {
    parts.len() > container.len() && parts.starts_with(container)
}

/// `_without_item`: `parts` as they are once the array item at `location` is gone.
fn without_item(parts: &[Part], location: &[Part]) -> Vec<Part> {
    let mut out = parts.to_vec();
    if let Some((Part::Index(removed), array)) = location.split_last() {
        if is_inside(parts, array) {
            if let Part::Index(i) = &mut out[array.len()] {
                if *i > *removed {
                    *i -= 1;
                }
            }
        }
    }
    out
}

/// `json.dumps(value)`, for comparing scalars.
fn dumps(value: &Value) -> String {
    serde_json::to_string(value).expect("JSON values serialize")
}

/// `json.dumps(_sorted_members(value))`: equal for values equal in JSON, whatever their key
/// order.
fn move_key(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    dumps(&sorted(value))
}

/// A JSON pointer (`~` and `/` in keys escaped).
fn pointer(path: &[Part]) -> String {
    path.iter()
        .map(|part| match part {
            Part::Key(key) => format!("/{}", key.replace('~', "~0").replace('/', "~1")),
            Part::Index(i) => format!("/{i}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(mut manifest: Value) -> Result<(), ManifestError> {
        validate_manifest(manifest.as_object_mut().unwrap(), "default")
    }

    fn valid() -> Value {
        let mut manifest = base_manifest();
        let container = &mut manifest["spec"]["template"]["spec"]["containers"][0];
        container["image"] = json!("img");
        container["env"] = json!([]);
        manifest["spec"]["backoffLimit"] = json!(0);
        manifest
    }

    #[test]
    fn the_base_job_with_extras_passes() {
        check(valid()).unwrap();
    }

    #[test]
    fn missing_paths_are_sorted_and_reported_before_incompatible_values() {
        let mut manifest = valid();
        manifest["kind"] = json!("CronJob");
        let spec = manifest["spec"]["template"]["spec"]
            .as_object_mut()
            .unwrap();
        spec.shift_remove("parallelism");
        spec.shift_remove("completions");
        assert_eq!(
            check(manifest).unwrap_err().to_string(),
            "Job is missing required attributes at the following paths: \
             /spec/template/spec/completions, /spec/template/spec/parallelism"
        );
    }

    #[test]
    fn incompatible_values_show_python_reprs() {
        let mut manifest = valid();
        manifest["spec"]["template"]["spec"]["parallelism"] = json!(1.0);
        manifest["spec"]["template"]["spec"]["restartPolicy"] = json!("OnFailure");
        manifest["metadata"] = json!({"labels": []});
        assert_eq!(
            check(manifest).unwrap_err().to_string(),
            "Job has incompatible values for the following attributes: \
             /metadata/labels must have value {}, \
             /spec/template/spec/parallelism must have value 1, \
             /spec/template/spec/restartPolicy must have value 'Never'"
        );
    }

    #[test]
    fn a_removed_equal_value_hides_a_missing_one() {
        let mut manifest = valid();
        manifest["spec"]["backoffLimit"] = json!(1);
        let spec = manifest["spec"]["template"]["spec"]
            .as_object_mut()
            .unwrap();
        spec.shift_remove("parallelism");
        check(manifest).unwrap();
    }

    #[test]
    fn containers_pass_when_one_is_exactly_the_base_container() {
        let mut manifest = valid();
        manifest["spec"]["template"]["spec"]["containers"] =
            json!([{"name": "a", "image": "x"}, {"name": "prefect-job"}, {"name": "b"}]);
        check(manifest.clone()).unwrap();
        manifest["spec"]["template"]["spec"]["containers"] =
            json!([{"name": "a", "image": "x"}, {"name": "prefect-job", "image": "y"}]);
        assert_eq!(
            check(manifest).unwrap_err(),
            ManifestError::IncompatibleValues(vec![
                "/spec/template/spec/containers/0/name must have value 'prefect-job'".into()
            ])
        );
    }

    #[test]
    fn metadata_is_completed_in_prefects_order() {
        let mut manifest = valid();
        manifest.as_object_mut().unwrap().shift_remove("metadata");
        let map = manifest.as_object_mut().unwrap();
        validate_manifest(map, "ns").unwrap();
        assert_eq!(
            serde_json::to_string(&map["metadata"]).unwrap(),
            r#"{"annotations":{},"labels":{},"namespace":"ns"}"#
        );
        assert_eq!(map.keys().next_back().map(String::as_str), Some("metadata"));
    }

    #[test]
    fn pointers_escape_keys() {
        let path = [Part::Key("a/b~c".into()), Part::Index(0)];
        assert_eq!(pointer(&path), "/a~1b~0c/0");
    }
}
