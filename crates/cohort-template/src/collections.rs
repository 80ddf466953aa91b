//! Key-path access and merging of JSON objects, mirroring the Prefect helpers the
//! rendering uses (`prefect/utilities/collections.py`: `get_from_dict`, `set_in_dict`,
//! `deep_merge`), quirks included.

use std::borrow::Cow;

use serde_json::Value;

use crate::Map;

/// Splits a key path the way Prefect does: `[` becomes `.`, `]` is dropped, then split
/// on `.` (`"a.b[0]"` → `["a", "b", "0"]`; `"a..b"` has an empty key).
fn split_key_path(path: &str) -> Vec<String> {
    path.replace('[', ".")
        .replace(']', "")
        .split('.')
        .map(str::to_owned)
        .collect()
}

/// A key-path segment as `get_from_dict` sees it: it first tries `int(key)`.
enum Key<'a> {
    /// Python's `int()` accepted it; `None` if it does not fit an `i64` (no list is that
    /// long, so the lookup fails either way).
    Int(Option<i64>),
    /// Used as a dict key.
    Str(&'a str),
}

/// Python's `int(str)` on a key-path segment: optional sign, ASCII digits, single
/// underscores between digits (`"+1"`, `"-1"`, `"1_0"` are integers).
///
/// Deviation: Python also accepts non-ASCII decimal digits (`"١"`); those are dict keys here.
fn classify(key: &str) -> Key<'_> {
    let unsigned = key.strip_prefix(['+', '-']).unwrap_or(key);
    let well_formed = !unsigned.is_empty()
        && unsigned
            .split('_')
            .all(|group| !group.is_empty() && group.bytes().all(|b| b.is_ascii_digit()));
    if !well_formed {
        return Key::Str(key);
    }
    let digits: String = key.chars().filter(|c| *c != '_').collect();
    Key::Int(digits.parse().ok())
}

/// One step of `value[key]`, `None` where Python raises `KeyError`, `IndexError` or
/// `TypeError`.
///
/// Quirks kept from Python: an integer key never finds a dict entry (JSON keys are
/// strings, so `"a.0"` cannot reach `{"a": {"0": …}}`); negative indices count from the
/// end; an integer key indexes a *string* by code point (`"{{ s[0] }}"` is its first
/// character).
fn step<'v>(value: Cow<'v, Value>, key: &str) -> Option<Cow<'v, Value>> {
    match classify(key) {
        Key::Str(k) => match value {
            Cow::Borrowed(Value::Object(map)) => map.get(k).map(Cow::Borrowed),
            Cow::Owned(Value::Object(mut map)) => map.remove(k).map(Cow::Owned),
            _ => None,
        },
        Key::Int(i) => {
            let i = i?;
            if let Some(s) = value.as_str() {
                let at = index(s.chars().count(), i)?;
                let c = s.chars().nth(at)?;
                return Some(Cow::Owned(Value::String(c.to_string())));
            }
            match value {
                Cow::Borrowed(Value::Array(items)) => {
                    index(items.len(), i).map(|at| Cow::Borrowed(&items[at]))
                }
                Cow::Owned(Value::Array(mut items)) => {
                    index(items.len(), i).map(|at| Cow::Owned(items.swap_remove(at)))
                }
                _ => None,
            }
        }
    }
}

/// Python's index semantics: `-len <= i < len`, negative from the end.
fn index(len: usize, i: i64) -> Option<usize> {
    let len = i64::try_from(len).ok()?;
    let at = if i < 0 { len + i } else { i };
    if (0..len).contains(&at) {
        usize::try_from(at).ok()
    } else {
        None
    }
}

/// `get_from_dict(dct, path)` where `dct` is a top-level object: `None` is Prefect's
/// "missing" (`NotSet`), so a found JSON `null` is `Some(Value::Null)`.
pub(crate) fn get_from_map(map: &Map, path: &str) -> Option<Value> {
    let keys = split_key_path(path);
    let (first, rest) = keys.split_first()?;
    let mut current = match classify(first) {
        Key::Str(k) => Cow::Borrowed(map.get(k)?),
        Key::Int(_) => return None,
    };
    for key in rest {
        current = step(current, key)?;
    }
    Some(current.into_owned())
}

/// `get_from_dict(value, path)` for any JSON value (block data after unwrapping may be a
/// string or list).
pub(crate) fn get_from_value(value: &Value, path: &str) -> Option<Value> {
    let mut current = Cow::Borrowed(value);
    for key in split_key_path(path) {
        current = step(current, &key)?;
    }
    Some(current.into_owned())
}

/// `set_in_dict(dct, path, value)`: creates missing objects along the path; fails where
/// the path runs through a value that is not an object. Segments are always dict keys
/// here (`"a[0]"` sets key `"0"` of object `a`), unlike [`get_from_map`].
///
/// The error is the path prefix that is not an object.
pub(crate) fn set_in_map(map: &mut Map, path: &str, value: Value) -> Result<(), String> {
    let keys = split_key_path(path);
    let (last, parents) = keys.split_last().expect("split yields at least one key");
    let mut current = map;
    for (depth, key) in parents.iter().enumerate() {
        let slot = current
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        current = match slot {
            Value::Object(inner) => inner,
            _ => return Err(keys[..=depth].join(".")),
        };
    }
    current.insert(last.clone(), value);
    Ok(())
}

/// `deep_merge(dct, merge)`: a copy of `dct` with `merge` laid over it, recursing where
/// both sides hold an object; otherwise `merge`'s value wins. Existing keys keep their
/// position, new keys are appended (Python dict order).
pub(crate) fn deep_merge(dct: &Map, merge: &Map) -> Map {
    let mut result = dct.clone();
    for (key, value) in merge {
        let merged = match (result.get(key), value) {
            (Some(Value::Object(ours)), Value::Object(theirs)) => {
                Value::Object(deep_merge(ours, theirs))
            }
            _ => value.clone(),
        };
        result.insert(key.clone(), merged);
    }
    result
}

/// Python's `dict | dict` (and `dict.update`): `right` wins, order as in [`deep_merge`].
pub(crate) fn union(left: &Map, right: &Map) -> Map {
    let mut result = left.clone();
    for (key, value) in right {
        result.insert(key.clone(), value.clone());
    }
    result
}

/// Python truthiness of a JSON value (`None`, `False`, `0`, `0.0`, `""`, `[]`, `{}` are falsy).
pub(crate) fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> Map {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn get_follows_prefect_key_paths() {
        let values = map(json!({
            "a": {"b": {"c": [1, 2, 3, 4]}, "0": "zero", "": "empty"},
            "list": [0, {"c": [1, 2]}],
            "s": "héllo",
            "n": null,
        }));
        // Examples from get_from_dict's docstring, then the quirks.
        assert_eq!(get_from_map(&values, "a.b.c[1]"), Some(json!(2)));
        assert_eq!(get_from_map(&values, "list.1.c.1"), Some(json!(2)));
        assert_eq!(get_from_map(&values, "list.1.c.2"), None);
        assert_eq!(get_from_map(&values, "a.b.c[-1]"), Some(json!(4)));
        assert_eq!(get_from_map(&values, "a.b.c[+1]"), Some(json!(2)));
        assert_eq!(get_from_map(&values, "a.b.c[-5]"), None);
        assert_eq!(get_from_map(&values, "a.b.c[99999999999999999999]"), None);
        assert_eq!(
            get_from_map(&values, "a.0"),
            None,
            "int key never hits a dict"
        );
        assert_eq!(get_from_map(&values, "a."), Some(json!("empty")));
        assert_eq!(get_from_map(&values, "s[1]"), Some(json!("é")));
        assert_eq!(get_from_map(&values, "s[-1]"), Some(json!("o")));
        assert_eq!(get_from_map(&values, "s.x"), None);
        assert_eq!(get_from_map(&values, "list.x"), None);
        assert_eq!(get_from_map(&values, "n"), Some(Value::Null));
        assert_eq!(get_from_map(&values, "n.x"), None);
        assert_eq!(get_from_map(&values, "missing"), None);
        assert_eq!(get_from_map(&values, "a]b"), None);
    }

    #[test]
    fn int_classification_matches_python_int() {
        for (key, want) in [
            ("0", Some(0)),
            ("007", Some(7)),
            ("-1", Some(-1)),
            ("+3", Some(3)),
            ("1_0", Some(10)),
        ] {
            assert!(
                matches!(classify(key), Key::Int(Some(i)) if Some(i) == want),
                "{key}"
            );
        }
        for key in ["", "_1", "1_", "1__0", "--1", "1.0", "x1", "-", "1e3"] {
            assert!(matches!(classify(key), Key::Str(_)), "{key}");
        }
    }

    #[test]
    fn get_from_value_reaches_into_lists_and_strings() {
        let data = json!({"list": [{"list-key": "list-value"}, 1, 2]});
        assert_eq!(
            get_from_value(&data, "list[0].list-key"),
            Some(json!("list-value"))
        );
        assert_eq!(get_from_value(&json!("secret"), "0"), Some(json!("s")));
    }

    #[test]
    fn set_creates_objects_and_refuses_non_objects() {
        let mut target = Map::new();
        set_in_map(&mut target, "env.FOO", json!("x")).unwrap();
        set_in_map(&mut target, "env.BAR", json!(1)).unwrap();
        set_in_map(&mut target, "a[0]", json!(true)).unwrap();
        assert_eq!(
            Value::Object(target.clone()),
            json!({"env": {"FOO": "x", "BAR": 1}, "a": {"0": true}})
        );
        assert_eq!(
            set_in_map(&mut target, "env.FOO.deeper", json!(1)),
            Err("env.FOO".to_owned())
        );
    }

    #[test]
    fn deep_merge_recurses_only_into_objects_on_both_sides() {
        let a = map(json!({"x": {"y": 1, "z": 2}, "l": [1], "k": 1}));
        let b = map(json!({"x": {"z": 3, "w": 4}, "l": [2], "new": null}));
        let merged = deep_merge(&a, &b);
        assert_eq!(
            serde_json::to_string(&merged).unwrap(),
            r#"{"x":{"y":1,"z":3,"w":4},"l":[2],"k":1,"new":null}"#
        );
    }

    #[test]
    fn truthiness_is_pythons() {
        for falsy in [
            json!(null),
            json!(false),
            json!(0),
            json!(0.0),
            json!(""),
            json!([]),
            json!({}),
        ] {
            assert!(!truthy(&falsy), "{falsy}");
        }
        for t in [
            json!(true),
            json!(-1),
            json!(0.5),
            json!(" "),
            json!([0]),
            json!({"a": null}),
        ] {
            assert!(truthy(&t), "{t}");
        }
    }
}
