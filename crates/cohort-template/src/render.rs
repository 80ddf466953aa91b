//! Rendering a work pool's base job template with job variables, mirroring
//! `prefect/workers/base.py: BaseJobConfiguration.resolve_for_flow_run` (variable merge)
//! and `BaseJobConfiguration.from_template_and_values` up to `apply_values`
//! (`prefect/utilities/templating/__init__.py`).

use serde_json::Value;

use crate::collections::{deep_merge, get_from_map, set_in_map, truthy, union};
use crate::error::{json_type_name, TemplateError};
use crate::placeholder::{replace_each, scan, PlaceholderType, ENV_VAR_PREFIX};
use crate::pystr::python_str;
use crate::Map;

/// Merges a deployment's job variables with a flow run's, as
/// `BaseJobConfiguration.resolve_for_flow_run` does: the flow run wins key by key
/// (shallow), except that when the deployment's `env` is an object the flow run's `env`
/// is merged into it (flow run wins per variable).
///
/// Where the deployment's `env` is an object and the flow run's `env` is not, Prefect's
/// `dict.update` raises (or, for a list of pairs, accepts it); here the flow run's value
/// simply replaces `env`, and [`render`] / [`crate::validate_base_fields`] report the
/// bad shape.
pub fn merge_job_variables(deployment: &Map, flow_run: &Map) -> Map {
    let mut merged = deployment.clone();
    let mut flow_run = flow_run.clone();
    if let Some(Value::Object(env)) = merged.get_mut("env") {
        if let Some(Value::Object(run_env)) = flow_run.get("env") {
            for (key, value) in run_env {
                env.insert(key.clone(), value.clone());
            }
            flow_run.shift_remove("env");
        }
    }
    for (key, value) in flow_run {
        merged.insert(key, value);
    }
    merged
}

/// Renders a work pool's base job template (`{"job_configuration": …, "variables": …}`)
/// with job variables into a job configuration, as
/// `BaseJobConfiguration.from_template_and_values` does before block and variable
/// resolution:
///
/// 1. Variables start from the non-null `default`s of `variables.properties`.
/// 2. A truthy `env` default is merged into `job_configuration.env` when that is an
///    object, else replaces it (even a `"{{ env }}"` placeholder, even an absent key).
/// 3. Job variables with dotted keys (`"env.FOO"`, `"a[0]"`) are expanded into objects
///    first; plain keys are laid over them (deep merge where both are objects). The
///    result replaces the defaults key by key (shallow).
/// 4. If `job_configuration.env` is now an object, the `env` variable is merged into it.
///    Its values are then templated like the rest of `job_configuration`.
/// 5. Placeholders are applied: a string that is exactly one `{{ name }}` becomes the
///    value with its JSON type, or disappears (object key or list item) when the
///    variable is missing; otherwise each `{{ name }}` becomes the value's Python `str()`
///    or `""`, each `{{ $NAME }}` becomes `env_lookup(NAME)` or `""`.
///    `{{ prefect.variables.… }}` and `{{ prefect.blocks.… }}` are left for the later
///    phases.
///
/// A top-level `env` that rendered to something other than an object is refused, as
/// Prefect's model refuses it, unless it is a string still holding a block or variable
/// placeholder (which may yet resolve to an object).
pub fn render(
    template: &Value,
    values: &Map,
    env_lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Map, TemplateError> {
    let template = template
        .as_object()
        .ok_or_else(|| TemplateError::malformed("base job template is not a JSON object"))?;
    let mut base_config = match template.get("job_configuration") {
        Some(Value::Object(config)) => config.clone(),
        Some(other) => {
            return Err(TemplateError::malformed(format!(
                "`job_configuration` must be an object, not {}",
                json_type_name(other)
            )))
        }
        None => {
            return Err(TemplateError::malformed(
                "base job template has no `job_configuration` object",
            ))
        }
    };
    let variables_schema = match template.get("variables") {
        Some(Value::Object(schema)) => schema,
        Some(other) => {
            return Err(TemplateError::malformed(format!(
                "`variables` must be an object (a JSON schema), not {}",
                json_type_name(other)
            )))
        }
        None => {
            return Err(TemplateError::malformed(
                "base job template has no `variables` object",
            ))
        }
    };
    let empty = Map::new();
    let properties = match variables_schema.get("properties") {
        None => &empty,
        Some(Value::Object(properties)) => properties,
        Some(other) => {
            return Err(TemplateError::malformed(format!(
                "`variables.properties` must be an object, not {}",
                json_type_name(other)
            )))
        }
    };

    let mut variables = defaults(properties)?;

    // Step 2: the `env` default goes into the config before job variables can replace it.
    if let Some(default_env) = variables.get("env").filter(|env| truthy(env)) {
        let merged = match (base_config.get("env"), default_env) {
            (Some(Value::Object(config_env)), Value::Object(default_env)) => {
                Value::Object(union(config_env, default_env))
            }
            (Some(Value::Object(_)), other) => {
                return Err(TemplateError::malformed(format!(
                    "the default of variable `env` must be an object to merge into \
                     `job_configuration.env`, not {}",
                    json_type_name(other)
                )))
            }
            (_, default_env) => default_env.clone(),
        };
        base_config.insert("env".to_owned(), merged);
    }

    // Step 3: dotted keys first, so that the nested spelling wins over the dotted one.
    let mut transformed = Map::new();
    for (key, value) in values.iter().filter(|(key, _)| key.contains('.')) {
        set_in_map(&mut transformed, key, value.clone()).map_err(|prefix| {
            TemplateError::invalid_variables(format!(
                "cannot set `{key}`: `{prefix}` is already set to a value that is not an object"
            ))
        })?;
    }
    for (key, value) in values.iter().filter(|(key, _)| !key.contains('.')) {
        let value = match (transformed.get(key), value) {
            (Some(Value::Object(dotted)), Value::Object(nested)) => {
                Value::Object(deep_merge(dotted, nested))
            }
            _ => value.clone(),
        };
        transformed.insert(key.clone(), value);
    }
    for (key, value) in transformed {
        variables.insert(key, value);
    }

    // Step 4: deployment / flow-run env on top of the pool's literal env.
    if let Some(Value::Object(config_env)) = base_config.get("env") {
        if let Some(env) = variables.get("env").filter(|env| truthy(env)) {
            let Value::Object(env) = env else {
                return Err(TemplateError::invalid_variables(format!(
                    "job variable `env` must be an object of environment variables, not {}",
                    json_type_name(env)
                )));
            };
            let merged = union(config_env, env);
            base_config.insert("env".to_owned(), Value::Object(merged));
        }
    }

    // Step 5.
    let mut rendered = Map::new();
    for (key, value) in &base_config {
        if let Some(value) = apply_values(value, &variables, env_lookup) {
            rendered.insert(key.clone(), value);
        }
    }
    check_env_shape(&rendered)?;
    Ok(rendered)
}

/// `BaseJobConfiguration._get_base_config_defaults`: every variable whose schema has a
/// non-null `default`. Nulls are skipped on purpose in Prefect, so that a missing
/// variable removes its key and the model's own default applies.
///
/// A variable schema that is not an object is refused. Prefect crashes on most of those
/// too (`"default" in True`), but quietly skips a string or list without `"default"` in it.
fn defaults(properties: &Map) -> Result<Map, TemplateError> {
    let mut defaults = Map::new();
    for (name, schema) in properties {
        let Value::Object(schema) = schema else {
            return Err(TemplateError::malformed(format!(
                "the schema of variable `{name}` must be an object, not {}",
                json_type_name(schema)
            )));
        };
        match schema.get("default") {
            None | Some(Value::Null) => {}
            Some(default) => {
                defaults.insert(name.clone(), default.clone());
            }
        }
    }
    Ok(defaults)
}

/// `apply_values(template, values)` with `remove_notset=True`; `None` is Prefect's
/// `NotSet` (the caller drops the key or list item).
fn apply_values(
    template: &Value,
    values: &Map,
    env_lookup: &dyn Fn(&str) -> Option<String>,
) -> Option<Value> {
    match template {
        Value::String(s) => apply_to_string(s, values, env_lookup),
        Value::Object(map) => Some(Value::Object(
            map.iter()
                .filter_map(|(key, value)| {
                    apply_values(value, values, env_lookup).map(|value| (key.clone(), value))
                })
                .collect(),
        )),
        Value::Array(items) => Some(Value::Array(
            items
                .iter()
                .filter_map(|item| apply_values(item, values, env_lookup))
                .collect(),
        )),
        Value::Null | Value::Bool(_) | Value::Number(_) => Some(template.clone()),
    }
}

fn apply_to_string(
    s: &str,
    values: &Map,
    env_lookup: &dyn Fn(&str) -> Option<String>,
) -> Option<Value> {
    let Some(first) = scan(s).next() else {
        return Some(Value::String(s.to_owned()));
    };
    // Only a standard placeholder is replaced whole; `{{ $X }}` alone still goes
    // through text substitution below, so it always yields a string.
    if first.spans(s) && first.kind() == PlaceholderType::Standard {
        return get_from_map(values, first.name);
    }
    let Ok(text) = replace_each(s, |m| {
        Ok::<_, std::convert::Infallible>(match m.kind() {
            PlaceholderType::Standard => Some(
                get_from_map(values, m.name)
                    .map(|value| python_str(&value))
                    .unwrap_or_default(),
            ),
            // Prefect strips every leading `$` (`str.lstrip`).
            PlaceholderType::EnvVar => Some(
                Some(m.name.trim_start_matches(ENV_VAR_PREFIX))
                    .filter(|name| !name.is_empty())
                    .and_then(env_lookup)
                    .unwrap_or_default(),
            ),
            PlaceholderType::Variable | PlaceholderType::BlockDocument => None,
        })
    });
    Some(Value::String(text))
}

/// Refuses a rendered top-level `env` that Prefect's `BaseJobConfiguration._coerce_env`
/// would crash on (`.items()` of a non-dict), except a string that still holds a block
/// or variable placeholder: that is resolved later and checked by
/// [`crate::validate_base_fields`]. A list of objects is Kubernetes' shape, which its job
/// configuration takes (`prefect_kubernetes/worker.py: KubernetesWorkerJobConfiguration`);
/// the other workers refuse it when they read `env`.
fn check_env_shape(config: &Map) -> Result<(), TemplateError> {
    match config.get("env") {
        None | Some(Value::Object(_)) => Ok(()),
        Some(Value::Array(entries)) if entries.iter().all(Value::is_object) => Ok(()),
        Some(Value::String(s))
            if scan(s).any(|m| {
                matches!(
                    m.kind(),
                    PlaceholderType::Variable | PlaceholderType::BlockDocument
                )
            }) =>
        {
            Ok(())
        }
        Some(other) => Err(TemplateError::invalid_field(
            "env",
            format!(
                "must render to an object of environment variables, but rendered to {}",
                json_type_name(other)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    //! Expectations marked "Prefect 3.8.8" were produced by running the same input
    //! through `BaseJobConfiguration.from_template_and_values` of Prefect 3.8.8.

    use super::*;
    use crate::default_process_base_job_template;
    use serde_json::json;

    fn map(value: Value) -> Map {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn render_ok(template: &Value, values: Value) -> Map {
        render(template, &map(values), &no_env).expect("renders")
    }

    /// Compares JSON text, key order included.
    fn assert_json(actual: &Map, expected: &str) {
        let expected: Value = serde_json::from_str(expected).expect("expected is JSON");
        assert_eq!(
            serde_json::to_string(actual).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
    }

    fn with_env_default(env: Value) -> Value {
        let mut template = default_process_base_job_template();
        template["variables"]["properties"]["env"]["default"] = env;
        template
    }

    fn with_env_literal(env: Value) -> Value {
        let mut template = default_process_base_job_template();
        template["job_configuration"]["env"] = env;
        template
    }

    /// Prefect's `tests/workers/test_base_worker.py: test_env_merge_logic_is_deep`, with the
    /// pool's env as a variable default and as a literal in `job_configuration`.
    #[test]
    fn env_merge_logic_is_deep() {
        let matrix = [
            (
                json!({}),
                json!({"test-var": "foo"}),
                json!({"another-var": "boo"}),
                r#"{"test-var":"foo","another-var":"boo"}"#,
            ),
            (
                json!({"A": "1", "B": "2"}),
                json!({"A": "1", "B": "3"}),
                json!({}),
                r#"{"A":"1","B":"3"}"#,
            ),
            (
                json!({"A": "1"}),
                json!({"B": "2"}),
                json!({}),
                r#"{"A":"1","B":"2"}"#,
            ),
            (
                json!({"C": "42"}),
                json!({"C": "42"}),
                json!({"C": "3", "D": "4"}),
                r#"{"C":"3","D":"4"}"#,
            ),
            (
                json!({"A": "1", "B": "2"}),
                json!({"B": ""}),
                json!({}),
                r#"{"A":"1","B":""}"#,
            ),
        ];
        for (pool, deployment, flow_run, want_env) in matrix {
            let values = merge_job_variables(
                &map(json!({"env": deployment})),
                &map(json!({"env": flow_run})),
            );
            for template in [
                with_env_default(pool.clone()),
                with_env_literal(pool.clone()),
            ] {
                let config = render(&template, &values, &no_env).unwrap();
                // Prefect 3.8.8: the rest renders away, `stream_output` keeps its default.
                assert_json(
                    &config,
                    &format!(r#"{{"env":{want_env},"stream_output":true}}"#),
                );
            }
        }
    }

    #[test]
    fn merge_job_variables_merges_env_and_lets_the_flow_run_win() {
        let deployment =
            map(json!({"env": {"A": "1", "B": "2"}, "image": "a", "labels": {"x": "1"}}));
        let flow_run = map(json!({"env": {"B": "3", "C": "4"}, "labels": {"y": "2"}, "new": 1}));
        assert_json(
            &merge_job_variables(&deployment, &flow_run),
            r#"{"env":{"A":"1","B":"3","C":"4"},"image":"a","labels":{"y":"2"},"new":1}"#,
        );
        // No deployment env (or not an object): the flow run's env replaces it whole.
        assert_json(
            &merge_job_variables(&map(json!({"env": "x"})), &map(json!({"env": {"A": "1"}}))),
            r#"{"env":{"A":"1"}}"#,
        );
        assert_json(
            &merge_job_variables(&Map::new(), &map(json!({"env": {"A": "1"}}))),
            r#"{"env":{"A":"1"}}"#,
        );
        // Prefect raises here (`dict.update(list)`); the bad shape surfaces in render.
        assert_json(
            &merge_job_variables(
                &map(json!({"env": {"A": "1"}})),
                &map(json!({"env": ["B"]})),
            ),
            r#"{"env":["B"]}"#,
        );
        // No flow-run env keeps the deployment's.
        assert_json(
            &merge_job_variables(&map(json!({"env": {"A": "1"}})), &map(json!({"x": 1}))),
            r#"{"env":{"A":"1"},"x":1}"#,
        );
    }

    #[test]
    fn default_template_without_values() {
        // Prefect 3.8.8: null defaults are skipped, so their placeholders remove the keys.
        let config = render_ok(&default_process_base_job_template(), json!({}));
        assert_json(&config, r#"{"stream_output":true}"#);
    }

    #[test]
    fn default_template_with_every_value() {
        let config = render_ok(
            &default_process_base_job_template(),
            json!({
                "env": {"A": "1", "N": null, "I": 5}, "labels": {"team": "data"},
                "command": "echo hi", "stream_output": false, "working_dir": "/tmp/x",
                "name": "my-run", "extra": 1,
            }),
        );
        // Prefect 3.8.8, key order from `job_configuration`.
        assert_json(
            &config,
            r#"{"command":"echo hi","env":{"A":"1","N":null,"I":5},"labels":{"team":"data"},
                "name":"my-run","stream_output":false,"working_dir":"/tmp/x"}"#,
        );
    }

    #[test]
    fn dotted_keys_expand_and_nested_spelling_wins() {
        let template = default_process_base_job_template();
        // Prefect 3.8.8.
        assert_json(
            &render_ok(
                &template,
                json!({"env.FOO": "x", "env": {"BAR": "y"}, "labels.a": "b"}),
            ),
            r#"{"env":{"FOO":"x","BAR":"y"},"labels":{"a":"b"},"stream_output":true}"#,
        );
        assert_json(
            &render_ok(
                &template,
                json!({"env": {"FOO": "nested"}, "env.FOO": "dotted", "env.ONLY": "d"}),
            ),
            r#"{"env":{"FOO":"nested","ONLY":"d"},"stream_output":true}"#,
        );
        // Prefect 3.8.8 raises `TypeError: Key path exists and contains a non-dict value`.
        let err = render(&template, &map(json!({"a.b": 1, "a.b.c": 2})), &no_env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid job variables: cannot set `a.b.c`: `a.b` is already set to a value that is not an object"
        );
    }

    #[test]
    fn placeholders_render_like_prefect() {
        let template = json!({
            "job_configuration": {
                "s": "t={{ t }} f={{ f }} n={{ n }} i={{ i }} fl={{ fl }} big={{ big }} d={{ d }} l={{ l }} s={{ s }} miss={{ missing }}",
                "e": "home={{ $TPL_HOME }} none={{ $TPL_NOPE }} dd={{ $$TPL_HOME }}",
                "ew": "{{ $TPL_HOME }}",
                "em": "{{ $TPL_NOPE }}",
                "whole": ["{{ t }}", "{{ n }}", "{{ missing }}", "{{ d }}", "{{ fl }}", 7, null, true],
                "gone": "{{ missing }}",
                "path": "{{ d.k[1] }}|{{ l[-1] }}|{{ s[0] }}",
                "wp": "{{ l[0] }}",
                "nested": {"x": {"y": "{{ missing }}"}},
            },
            "variables": {"properties": {}},
        });
        let values = map(json!({
            "t": true, "f": false, "n": null, "i": 3, "fl": 1e16, "big": 2.0,
            "d": {"k": [1, "it's", null]}, "l": ["a", "say \"hi\""], "s": "héllo",
        }));
        let lookup = |name: &str| (name == "TPL_HOME").then(|| "/home/u".to_owned());
        let config = render(&template, &values, &lookup).unwrap();
        // Prefect 3.8.8 with TPL_HOME=/home/u in the worker's environment.
        assert_json(
            &config,
            r#"{"s":"t=True f=False n=None i=3 fl=1e+16 big=2.0 d={'k': [1, \"it's\", None]} l=['a', 'say \"hi\"'] s=héllo miss=",
                "e":"home=/home/u none= dd=/home/u","ew":"/home/u","em":"",
                "whole":[true,null,{"k":[1,"it's",null]},1e16,7,null,true],
                "path":"it's|say \"hi\"|h","wp":"a","nested":{"x":{}}}"#,
        );
    }

    #[test]
    fn defaults_are_replaced_shallowly_and_null_defaults_skipped() {
        let template = json!({
            "job_configuration": {"a": "{{ a }}", "b": "{{ b }}", "c": "{{ c }}", "labels": "{{ labels }}"},
            "variables": {"properties": {
                "a": {"default": 1}, "b": {"default": null}, "c": {"type": "string"},
                "labels": {"default": {"x": "1", "y": "2"}},
            }},
        });
        // Prefect 3.8.8.
        assert_json(
            &render_ok(&template, json!({"labels": {"z": "3"}})),
            r#"{"a":1,"labels":{"z":"3"}}"#,
        );
    }

    #[test]
    fn env_default_is_added_even_without_an_env_key() {
        let template = json!({
            "job_configuration": {"command": "{{ command }}"},
            "variables": {"properties": {"env": {"default": {"A": "1"}}}},
        });
        // Prefect 3.8.8.
        assert_json(&render_ok(&template, json!({})), r#"{"env":{"A":"1"}}"#);
    }

    #[test]
    fn job_variable_env_values_are_templated_only_when_pool_env_is_an_object() {
        let values = json!({
            "env": {"X": "{{ name }}", "Y": "{{ missing }}", "Z": "pre {{ missing }}"},
            "name": "run-name",
        });
        // Prefect 3.8.8: merged into the literal pool env first, so rendered (and `Y` dropped).
        assert_json(
            &render_ok(&with_env_literal(json!({"POOL": "p"})), values.clone()),
            r#"{"env":{"POOL":"p","X":"run-name","Z":"pre "},"name":"run-name","stream_output":true}"#,
        );
        // Prefect 3.8.8: substituted whole through "{{ env }}", so left as written.
        assert_json(
            &render_ok(&default_process_base_job_template(), values),
            r#"{"env":{"X":"{{ name }}","Y":"{{ missing }}","Z":"pre {{ missing }}"},"name":"run-name","stream_output":true}"#,
        );
    }

    #[test]
    fn variable_and_block_placeholders_are_left_for_later() {
        let template = json!({
            "job_configuration": {
                "v": "{{ prefect.variables.v }}",
                "b": "{{ prefect.blocks.secret.tok }}",
                "mix": "{{ prefect.variables.v }} {{ n }} {{ prefect.blocks.secret.tok }} {{ missing }}",
                "env": "{{ prefect.variables.env }}",
            },
            "variables": {"properties": {}},
        });
        assert_json(
            &render_ok(&template, json!({"n": 1})),
            r#"{"v":"{{ prefect.variables.v }}","b":"{{ prefect.blocks.secret.tok }}",
                "mix":"{{ prefect.variables.v }} 1 {{ prefect.blocks.secret.tok }} ",
                "env":"{{ prefect.variables.env }}"}"#,
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        let cases = [
            (json!([]), "base job template is not a JSON object"),
            (json!({"variables": {}}), "base job template has no `job_configuration` object"),
            (
                json!({"job_configuration": "x", "variables": {}}),
                "`job_configuration` must be an object, not a string",
            ),
            (json!({"job_configuration": {}}), "base job template has no `variables` object"),
            (
                json!({"job_configuration": {}, "variables": []}),
                "`variables` must be an object (a JSON schema), not a list",
            ),
            (
                json!({"job_configuration": {}, "variables": {"properties": []}}),
                "`variables.properties` must be an object, not a list",
            ),
            (
                json!({"job_configuration": {}, "variables": {"properties": null}}),
                "`variables.properties` must be an object, not null",
            ),
            (
                json!({"job_configuration": {}, "variables": {"properties": {"x": true}}}),
                "the schema of variable `x` must be an object, not a boolean",
            ),
            (
                json!({"job_configuration": {"env": {"A": "1"}},
                       "variables": {"properties": {"env": {"default": "x"}}}}),
                "the default of variable `env` must be an object to merge into `job_configuration.env`, not a string",
            ),
        ];
        for (template, reason) in cases {
            match render(&template, &Map::new(), &no_env) {
                Err(TemplateError::MalformedTemplate { reason: got }) => assert_eq!(got, reason),
                other => panic!("{template}: {other:?}"),
            }
        }
        // `properties` may be absent.
        assert_json(
            &render_ok(
                &json!({"job_configuration": {"a": "{{ a }}"}, "variables": {}}),
                json!({"a": [1]}),
            ),
            r#"{"a":[1]}"#,
        );
    }

    #[test]
    fn env_of_the_wrong_shape_is_refused() {
        // Prefect 3.8.8: `dict | list` TypeError.
        let err = render(
            &with_env_literal(json!({"A": "1"})),
            &map(json!({"env": ["A=1"]})),
            &no_env,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid job variables: job variable `env` must be an object of environment variables, not a list"
        );
        // Prefect 3.8.8: renders, then the model's `_coerce_env` raises AttributeError.
        for env in [json!(["A=1"]), json!(null), json!("A=1"), json!(3)] {
            let err = render(
                &default_process_base_job_template(),
                &map(json!({"env": env})),
                &no_env,
            )
            .unwrap_err();
            assert!(
                matches!(&err, TemplateError::InvalidJobConfiguration { field, .. } if field == "env"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn whole_value_env_var_placeholder_needs_a_name() {
        let template =
            json!({"job_configuration": {"a": "{{ $ }}", "b": "x{{ $$$HOME }}"}, "variables": {}});
        let lookup = |name: &str| Some(format!("<{name}>"));
        let config = render(&template, &Map::new(), &lookup).unwrap();
        assert_json(&config, r#"{"a":"","b":"x<HOME>"}"#);
    }
}
