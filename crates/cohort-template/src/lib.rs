//! Work pool job template rendering, as Prefect 3.8.8's worker does it: merging job
//! variables, rendering a base job template into a job configuration, and the later
//! phases that substitute block documents and Prefect variables.
//!
//! Everything here is pure: no IO, no async, no process environment (the worker's
//! environment is passed in as a lookup function). The API calls that fetch block
//! documents and variables belong to the caller, which lists what is needed with
//! [`block_references`] / [`variable_references`], fetches it, and hands the values back.
//!
//! The full pipeline of `prefect/workers/base.py: BaseWorker._get_configuration`:
//!
//! 1. [`merge_job_variables`] — deployment ⊕ flow run job variables.
//! 2. [`render`] — `BaseJobConfiguration.from_template_and_values` up to and including
//!    `apply_values` (`{{ name }}` and `{{ $ENV }}` placeholders).
//! 3. [`block_references`] → fetch → [`resolve_blocks`] (`resolve_block_document_references`).
//! 4. [`variable_references`] → fetch → [`resolve_variables`] (`resolve_variables`). Done
//!    after blocks, because a block's data may itself contain variable placeholders.
//! 5. [`validate_base_fields`] — the type checks Prefect's pydantic model applies to the
//!    fields every job configuration has (`command`, `env`, `labels`, `name`).
//!
//! Python's `str()` of a JSON value, used wherever a value is embedded in text, is
//! available as [`python_str`] (the worker needs it to coerce `env` values).
//!
//! ```
//! use cohort_template::{default_process_base_job_template, merge_job_variables, render, Map};
//! use serde_json::json;
//!
//! let as_map = |v: serde_json::Value| v.as_object().cloned().unwrap();
//! let values = merge_job_variables(
//!     &as_map(json!({"env": {"A": "1"}, "command": "echo {{ $USER }}"})),
//!     &as_map(json!({"env": {"B": "2"}})),
//! );
//! let config: Map = render(&default_process_base_job_template(), &values, &|_| None).unwrap();
//! assert_eq!(
//!     serde_json::Value::Object(config),
//!     json!({"command": "echo {{ $USER }}", "env": {"A": "1", "B": "2"}, "stream_output": true})
//! );
//! ```
//!
//! (A job variable's value is inserted as is by a whole-value placeholder, so the
//! `{{ $USER }}` inside `command` is not rendered: Prefect 3.8.8 does the same.)

#![forbid(unsafe_code)]

mod blocks;
mod collections;
mod defaults;
mod error;
pub mod fields;
mod placeholder;
mod pystr;
mod render;
mod validate;
mod variables;

pub use blocks::{block_references, resolve_blocks, BlockReference};
pub use defaults::default_process_base_job_template;
pub use error::TemplateError;
pub use placeholder::{find_placeholders, Placeholder, PlaceholderType};
pub use pystr::{python_repr, python_str};
pub use render::{merge_job_variables, render};
pub use validate::validate_base_fields;
pub use variables::{resolve_variables, variable_references};

/// A JSON object, in insertion order (serde_json's `preserve_order`), like a Python dict.
pub type Map = serde_json::Map<String, serde_json::Value>;

#[cfg(test)]
mod tests {
    //! The whole pipeline, and properties that hold for any input.

    use std::collections::HashMap;

    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;

    fn map(value: Value) -> Map {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Render, then blocks, then variables, fetching from in-memory stores.
    fn pipeline(
        template: &Value,
        values: &Map,
        env: &dyn Fn(&str) -> Option<String>,
        blocks: &HashMap<BlockReference, Map>,
        variables: &HashMap<String, Value>,
    ) -> Result<Map, TemplateError> {
        let mut config = render(template, values, env)?;
        let wanted: HashMap<_, _> = block_references(&config)
            .into_iter()
            .filter_map(|r| blocks.get(&r).map(|data| (r, data.clone())))
            .collect();
        resolve_blocks(&mut config, &wanted)?;
        let wanted: HashMap<_, _> = variable_references(&config)
            .into_iter()
            .filter_map(|name| variables.get(&name).map(|v| (name, v.clone())))
            .collect();
        resolve_variables(&mut config, &wanted);
        validate_base_fields(&config)?;
        Ok(config)
    }

    #[test]
    fn pipeline_matches_prefect() {
        let template = json!({
            "job_configuration": {
                "image": "{{ image }}",
                "tok": "{{ prefect.blocks.secret.tok }}",
                "url": "https://{{ prefect.blocks.secret.tok }}/{{ prefect.variables.v }}",
                "var": "{{ prefect.variables.obj }}",
                "varmiss": "{{ prefect.variables.nope }}",
                "ref": {"$ref": {"block_document_id": "id-1"}},
                "mix": "{{ prefect.variables.v }} {{ n }} {{ $TPL_HOME }}",
                "fromblock": "{{ prefect.blocks.json.cfg }}",
            },
            "variables": {"properties": {"image": {"default": "img:{{ prefect.variables.tag }}"}}},
        });
        let blocks = HashMap::from([
            (
                BlockReference::Name {
                    block_type_slug: "secret".into(),
                    block_document_name: "tok".into(),
                },
                map(json!({"value": "s3"})),
            ),
            (
                BlockReference::Name {
                    block_type_slug: "json".into(),
                    block_document_name: "cfg".into(),
                },
                map(json!({"value": {"k": "{{ prefect.variables.inner }}"}})),
            ),
            (BlockReference::Id("id-1".into()), map(json!({"x": 1}))),
        ]);
        let variables = HashMap::from([
            ("v".to_owned(), json!("vv")),
            ("obj".to_owned(), json!({"a": [1, null]})),
            ("tag".to_owned(), json!("3.12")),
            ("inner".to_owned(), json!("IN")),
        ]);
        let env = |name: &str| (name == "TPL_HOME").then(|| "/h".to_owned());
        let config = pipeline(&template, &map(json!({"n": 1})), &env, &blocks, &variables).unwrap();
        // Prefect 3.8.8 `from_template_and_values` with the same blocks and variables; note
        // the default `image` itself holding a variable, and the block data bringing one in.
        assert_eq!(
            serde_json::to_string(&config).unwrap(),
            r#"{"image":"img:3.12","tok":"s3","url":"https://s3/vv","var":{"a":[1,null]},"varmiss":"","ref":{"x":1},"mix":"vv 1 /h","fromblock":{"k":"IN"}}"#
        );
    }

    /// Any JSON value, with strings drawn to hit placeholder syntax often.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN/inf", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-z{} .$\\[\\]0-9_-]{0,24}".prop_map(Value::String),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("[a-z.$\\[\\]{} ]{0,8}", inner), 0..6)
                    .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
    }

    fn json_map() -> impl Strategy<Value = Map> {
        prop::collection::vec(("[a-z.\\[\\]0-9]{0,8}", json_value()), 0..6)
            .prop_map(|pairs| pairs.into_iter().collect())
    }

    /// JSON without any `{{` in its strings, and no `env` key at the top.
    fn json_without_placeholders() -> impl Strategy<Value = Value> {
        json_value().prop_map(strip_braces)
    }

    fn strip_braces(value: Value) -> Value {
        match value {
            Value::String(s) => Value::String(s.replace('{', "(")),
            Value::Array(items) => Value::Array(items.into_iter().map(strip_braces).collect()),
            Value::Object(map) => {
                Value::Object(map.into_iter().map(|(k, v)| (k, strip_braces(v))).collect())
            }
            other => other,
        }
    }

    fn standard_name() -> impl Strategy<Value = String> {
        "[a-z_][a-z0-9_]{0,6}(\\.[a-z0-9_]{1,4}|\\[[0-9]\\]){0,2}"
    }

    proptest! {
        #[test]
        fn rendering_never_panics(template in json_value(), values in json_map()) {
            let _ = render(&template, &values, &no_env);
            let template = json!({"job_configuration": template, "variables": {"properties": {}}});
            if let Ok(mut config) = render(&template, &values, &|n: &str| Some(n.to_owned())) {
                let _ = block_references(&config);
                let _ = resolve_blocks(&mut config, &HashMap::new());
                let names = variable_references(&config);
                let values: HashMap<String, Value> =
                    names.into_iter().map(|n| (n, json!(1))).collect();
                resolve_variables(&mut config, &values);
                let _ = validate_base_fields(&config);
            }
        }

        #[test]
        fn arbitrary_templates_with_arbitrary_env_defaults_never_panic(
            config in json_map(), env_default in json_value(), values in json_map()
        ) {
            let template = json!({
                "job_configuration": config,
                "variables": {"properties": {"env": {"default": env_default}}},
            });
            let _ = render(&template, &values, &no_env);
        }

        #[test]
        fn template_without_placeholders_renders_to_itself(
            config in json_map().prop_map(|m| {
                let Value::Object(m) = strip_braces(Value::Object(m)) else { unreachable!() };
                m
            }),
            values in prop::collection::vec(("[a-z]{0,8}", json_value()), 0..6),
        ) {
            // Plain keys: dotted ones may legitimately conflict with each other.
            let values: Map = values.into_iter().collect();
            let mut config = config;
            config.shift_remove("env");
            let template = json!({"job_configuration": config.clone(), "variables": {}});
            let rendered = render(&template, &values, &no_env).unwrap();
            prop_assert_eq!(
                serde_json::to_string(&rendered).unwrap(),
                serde_json::to_string(&config).unwrap()
            );
        }

        #[test]
        fn whole_value_placeholder_keeps_the_json_type(value in json_without_placeholders()) {
            let template = json!({
                "job_configuration": {"x": "{{ x }}", "list": ["{{x}}"], "deep": {"y": "{{  x  }}"}},
                "variables": {"properties": {}},
            });
            let values = map(json!({"x": value.clone()}));
            let rendered = render(&template, &values, &no_env).unwrap();
            prop_assert_eq!(&rendered["x"], &value);
            prop_assert_eq!(&rendered["list"], &json!([value.clone()]));
            prop_assert_eq!(&rendered["deep"]["y"], &value);
        }

        #[test]
        fn missing_standard_placeholders_leave_no_braces(
            parts in prop::collection::vec(
                prop_oneof![
                    "[a-z ,:/=-]{0,6}",
                    standard_name().prop_map(|n| format!("{{{{ {n} }}}}")),
                ],
                0..6,
            ),
        ) {
            let text: String = parts.concat();
            let template = json!({
                "job_configuration": {"s": text.clone(), "l": [text.clone()]},
                "variables": {"properties": {}},
            });
            let rendered = render(&template, &Map::new(), &no_env).unwrap();
            for value in rendered.values() {
                prop_assert!(!value.to_string().contains("{{"), "{} -> {}", text, value);
            }
        }

        #[test]
        fn embedded_values_use_python_str(value in json_without_placeholders()) {
            let template = json!({"job_configuration": {"s": "<{{ v }}>"}, "variables": {}});
            let rendered = render(&template, &map(json!({"v": value.clone()})), &no_env).unwrap();
            prop_assert_eq!(&rendered["s"], &json!(format!("<{}>", python_str(&value))));
        }

        #[test]
        fn python_float_repr_round_trips(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
            let text = python_str(&json!(f));
            prop_assert_eq!(text.parse::<f64>().unwrap(), f);
            prop_assert!(text.contains('.') || text.contains('e'), "{}", text);
        }

        #[test]
        fn resolving_every_variable_leaves_no_variable_placeholder(config in json_map()) {
            let mut config = config;
            let names = variable_references(&config);
            let values: HashMap<String, Value> =
                names.into_iter().map(|n| (n, json!("v"))).collect();
            resolve_variables(&mut config, &values);
            prop_assert!(variable_references(&config).is_empty());
        }
    }

    #[test]
    fn resolving_variables_in_generated_placeholders() {
        let mut config = map(json!({"a": ["{{ prefect.variables.x }}-{{prefect.variables.y}}"]}));
        resolve_variables(
            &mut config,
            &HashMap::from([("x".to_owned(), json!(true)), ("y".to_owned(), json!(null))]),
        );
        assert_eq!(config["a"], json!(["True-None"]));
    }
}
