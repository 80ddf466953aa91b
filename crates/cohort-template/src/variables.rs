//! Prefect variable placeholders (`{{ prefect.variables.NAME }}`), the last substitution
//! phase, mirroring `prefect/utilities/templating/__init__.py: resolve_variables`.

use std::collections::HashMap;

use serde_json::Value;

use crate::placeholder::{replace_each, scan, shape, PlaceholderType, Shape, VARIABLE_PREFIX};
use crate::pystr::python_str;
use crate::Map;

/// The variable name Prefect reads for a placeholder name: it removes *every*
/// occurrence of `prefect.variables.` (`str.replace`), so
/// `prefect.variables.a.prefect.variables.b` reads variable `a.b`.
fn variable_name(placeholder_name: &str) -> String {
    placeholder_name.replace(VARIABLE_PREFIX, "")
}

/// The names of the Prefect variables referenced as `{{ prefect.variables.NAME }}` in
/// the string values of `config`, each once, in order of first appearance: what the
/// caller must fetch (`GET /variables/name/{name}`) before [`resolve_variables`].
///
/// Call it after [`crate::resolve_blocks`]: block data can bring variable placeholders in.
pub fn variable_references(config: &Map) -> Vec<String> {
    let mut names = Vec::new();
    for value in config.values() {
        collect(value, &mut names);
    }
    names
}

fn collect(value: &Value, names: &mut Vec<String>) {
    match value {
        Value::String(s) => {
            for m in scan(s).filter(|m| m.kind() == PlaceholderType::Variable) {
                let name = variable_name(m.name);
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect(item, names)),
        Value::Object(map) => map.values().for_each(|item| collect(item, names)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Substitutes Prefect variables in the string values of `config`, given their values by
/// name (a variable absent from `values` does not exist on the server).
///
/// A string that is exactly one variable placeholder becomes the variable's value with
/// its JSON type (a missing variable gives `""`, not a removed key); otherwise each
/// variable placeholder becomes the value's Python `str()`, or `""` when missing. Other
/// placeholders are left as they are.
pub fn resolve_variables(config: &mut Map, values: &HashMap<String, Value>) {
    for value in config.values_mut() {
        resolve(value, values);
    }
}

fn resolve(value: &mut Value, values: &HashMap<String, Value>) {
    match value {
        Value::String(s) => {
            let replacement = match shape(s, PlaceholderType::Variable) {
                Shape::Untouched => return,
                Shape::Whole(m) => values
                    .get(&variable_name(m.name))
                    .cloned()
                    .unwrap_or_else(|| Value::String(String::new())),
                Shape::Embedded => {
                    let Ok(text) = replace_each(s, |m| {
                        Ok::<_, std::convert::Infallible>(
                            (m.kind() == PlaceholderType::Variable).then(|| {
                                values
                                    .get(&variable_name(m.name))
                                    .map(python_str)
                                    .unwrap_or_default()
                            }),
                        )
                    });
                    Value::String(text)
                }
            };
            *value = replacement;
        }
        Value::Array(items) => items.iter_mut().for_each(|item| resolve(item, values)),
        Value::Object(map) => map.values_mut().for_each(|item| resolve(item, values)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
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

    fn config() -> Map {
        map(json!({
            "whole": "{{ prefect.variables.obj }}",
            "embedded": "x={{ prefect.variables.obj }} n={{prefect.variables.num}} m={{ prefect.variables.missing }}",
            "list": ["{{ prefect.variables.missing }}", "{{ prefect.variables.null }}", 3],
            "other": "{{ name }} {{ prefect.blocks.secret.s }} {{ prefect.variables.num }}",
            "key-untouched": {"{{ prefect.variables.k }}": "{{ prefect.variables.prefect.variables.num }}"},
            "untouched": "{{ name }}",
        }))
    }

    #[test]
    fn lists_each_referenced_variable_once_in_order() {
        assert_eq!(
            variable_references(&config()),
            ["obj", "num", "missing", "null"]
        );
    }

    #[test]
    fn substitutes_whole_typed_and_embedded_as_python_str() {
        let mut config = config();
        let values = HashMap::from([
            ("obj".to_owned(), json!({"a": [1, true]})),
            ("num".to_owned(), json!(1.0)),
            ("null".to_owned(), Value::Null),
        ]);
        resolve_variables(&mut config, &values);
        assert_eq!(
            Value::Object(config),
            json!({
                "whole": {"a": [1, true]},
                "embedded": "x={'a': [1, True]} n=1.0 m=",
                "list": ["", null, 3],
                "other": "{{ name }} {{ prefect.blocks.secret.s }} 1.0",
                "key-untouched": {"{{ prefect.variables.k }}": 1.0},
                "untouched": "{{ name }}",
            })
        );
    }

    #[test]
    fn a_substituted_value_is_not_substituted_again() {
        let mut config = map(json!({"x": "{{ prefect.variables.a }} {{ prefect.variables.b }}"}));
        let values = HashMap::from([
            ("a".to_owned(), json!("{{ prefect.variables.b }}")),
            ("b".to_owned(), json!("B")),
        ]);
        resolve_variables(&mut config, &values);
        assert_eq!(config["x"], json!("{{ prefect.variables.b }} B"));
    }
}
