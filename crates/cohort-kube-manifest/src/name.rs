//! The `name` of the infrastructure, rendered for the run (`prefect/workers/base.py:
//! BaseJobConfiguration.prepare_for_flow_run`): `{{ ctx.flow.* }}` and `{{ ctx.flow_run.* }}`
//! from the flow and flow run, `{{ $VAR }}` from the worker's environment, with
//! `prefect/utilities/templating: apply_values` rules.
//!
//! * A name that is exactly one `{{ ctx.… }}` becomes that value with its JSON type (a falsy
//!   one then gives way to the flow run's name), or stays as written when the value is missing.
//! * Otherwise each `{{ ctx.… }}` becomes the value's Python `str()`, or `""` when missing;
//!   each `{{ $VAR }}` the variable or `""`; `{{ prefect.variables.… }}` and
//!   `{{ prefect.blocks.… }}` stay as written.

use cohort_template::{find_placeholders, python_str, PlaceholderType};
use serde_json::Value;

/// Looks a variable up in the worker's own environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The rendered name: text, or whatever a lone placeholder held.
pub(crate) fn render_name(name: &str, ctx: &Value, env: Option<EnvLookup<'_>>) -> Value {
    let placeholders = find_placeholders(&Value::String(name.to_owned()));
    if let [only] = placeholders.as_slice() {
        if only.full_match == name && only.kind == PlaceholderType::Standard {
            return get_from_dict(ctx, &only.name)
                .unwrap_or_else(|| Value::String(name.to_owned()));
        }
    }
    let mut rendered = name.to_owned();
    for placeholder in &placeholders {
        let text = match placeholder.kind {
            PlaceholderType::Standard => get_from_dict(ctx, &placeholder.name)
                .map(|value| python_str(&value))
                .unwrap_or_default(),
            PlaceholderType::EnvVar => env
                .and_then(|lookup| lookup(placeholder.name.trim_start_matches('$')))
                .unwrap_or_default(),
            PlaceholderType::Variable | PlaceholderType::BlockDocument => continue,
        };
        rendered = rendered.replace(&placeholder.full_match, &text);
    }
    Value::String(rendered)
}

/// `prefect/utilities/collections.py: get_from_dict` with a dotted path (`a.b[0].c`): integer
/// parts index lists and strings (negative from the end), other parts look up object keys.
fn get_from_dict(root: &Value, path: &str) -> Option<Value> {
    let path = path.replace('[', ".").replace(']', "");
    let mut value = root;
    let mut parts = path.split('.');
    while let Some(part) = parts.next() {
        match (python_int(part), value) {
            (Some(i), Value::Array(items)) => value = items.get(python_index(i, items.len())?)?,
            (Some(i), Value::String(s)) => {
                // Python indexes a string by character, and the character on as a string.
                let chars: Vec<char> = s.chars().collect();
                let ch = Value::String(chars.get(python_index(i, chars.len())?)?.to_string());
                let rest: Vec<&str> = parts.collect();
                return match rest.is_empty() {
                    true => Some(ch),
                    false => get_from_dict(&ch, &rest.join(".")),
                };
            }
            (None, Value::Object(map)) => value = map.get(part)?,
            _ => return None,
        }
    }
    Some(value.clone())
}

/// Python's `int(part)` for the text of a placeholder path part: an optional sign, ASCII
/// digits, single underscores between digits.
fn python_int(part: &str) -> Option<i64> {
    let digits = part.strip_prefix(['+', '-']).unwrap_or(part);
    let valid = !digits.is_empty()
        && !digits.starts_with('_')
        && !digits.ends_with('_')
        && !digits.contains("__")
        && digits.chars().all(|c| c.is_ascii_digit() || c == '_');
    if !valid {
        return None;
    }
    part.replace('_', "").parse().ok()
}

fn python_index(i: i64, len: usize) -> Option<usize> {
    let len = i64::try_from(len).ok()?;
    let i = if i < 0 { i + len } else { i };
    usize::try_from(i).ok().filter(|_| (0..len).contains(&i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        json!({"ctx": {
            "flow": {"name": "my-flow", "tags": ["a", "b"]},
            "flow_run": {"name": "witty-otter", "run_count": 0, "parameters": {"x": {"y": 1}}},
        }})
    }

    fn render(name: &str) -> Value {
        render_name(
            name,
            &ctx(),
            Some(&|v: &str| (v == "HOME").then(|| "/h".to_owned())),
        )
    }

    #[test]
    fn embedded_placeholders_become_text() {
        assert_eq!(
            render("{{ ctx.flow.name }}-{{ ctx.flow_run.name }}"),
            json!("my-flow-witty-otter")
        );
        assert_eq!(render("x-{{ ctx.nope }}-{{ nothing }}"), json!("x--"));
        assert_eq!(
            render("{{ ctx.flow_run.parameters }}!"),
            json!("{'x': {'y': 1}}!")
        );
        assert_eq!(
            render("{{ ctx.flow.tags[1] }}{{ ctx.flow.tags.-1 }}x"),
            json!("bbx")
        );
        assert_eq!(render("{{ $HOME }}"), json!("/h"));
        assert_eq!(
            render("{{ ctx.flow_run.name[0] }}{{ ctx.flow_run.name.-1.0 }}"),
            json!("wr")
        );
        assert_eq!(
            render("{{ prefect.variables.v }}-{{ $NOPE }}"),
            json!("{{ prefect.variables.v }}-")
        );
    }

    #[test]
    fn a_lone_placeholder_keeps_the_type_or_the_text() {
        assert_eq!(render("{{ ctx.flow_run.run_count }}"), json!(0));
        assert_eq!(render("{{ ctx.flow_run.parameters.x }}"), json!({"y": 1}));
        assert_eq!(
            render("{{ ctx.flow_run.nope }}"),
            json!("{{ ctx.flow_run.nope }}")
        );
    }

    #[test]
    fn integers_parse_like_python() {
        assert_eq!(python_int("1_0"), Some(10));
        assert_eq!(python_int("-1"), Some(-1));
        assert_eq!(python_int("_1"), None);
        assert_eq!(python_int("name"), None);
    }
}
