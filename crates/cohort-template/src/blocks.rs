//! Block document references — `{"$ref": {"block_document_id": …}}` objects and
//! `{{ prefect.blocks.<slug>.<name>[.<key path>] }}` placeholders — mirroring
//! `prefect/utilities/templating/__init__.py: resolve_block_document_references`.
//!
//! Fetching the documents is the caller's job: [`block_references`] lists them,
//! [`resolve_blocks`] substitutes the fetched data.

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;

use crate::collections::{get_from_value, truthy};
use crate::error::{json_type_name, TemplateError};
use crate::placeholder::{
    replace_each, scan, shape, PlaceholderType, Shape, BLOCK_DOCUMENT_PREFIX,
};
use crate::pystr::python_str;
use crate::Map;

/// A block document a job configuration refers to; what the caller fetches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BlockReference {
    /// `{"$ref": {"block_document_id": "<id>"}}`: `GET /block_documents/{id}`; the whole
    /// object is replaced by the document's `data`.
    Id(String),
    /// `{{ prefect.blocks.<block_type_slug>.<block_document_name>… }}`:
    /// `GET /block_types/slug/{slug}/block_documents/name/{name}`.
    Name {
        /// The block type's slug (`secret`, `aws-credentials`, …).
        block_type_slug: String,
        /// The block document's name.
        block_document_name: String,
    },
}

impl fmt::Display for BlockReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "block document with ID '{id}'"),
            Self::Name {
                block_type_slug,
                block_document_name,
            } => write!(
                f,
                "'{block_document_name}' of block type '{block_type_slug}'"
            ),
        }
    }
}

/// A parsed `prefect.blocks.…` placeholder name.
struct NamedBlock {
    reference: BlockReference,
    /// Everything after `<slug>.<name>.`, itself a key path into the data.
    key_path: Option<String>,
}

/// Prefect: remove every `prefect.blocks.` (`str.replace`), then `split(".", 2)`.
/// `None` when there is no document name (Prefect: "Invalid block placeholder format").
fn parse_block_name(name: &str) -> Option<NamedBlock> {
    let stripped = name.replace(BLOCK_DOCUMENT_PREFIX, "");
    let mut parts = stripped.splitn(3, '.');
    let block_type_slug = parts.next()?.to_owned();
    let block_document_name = parts.next()?.to_owned();
    Some(NamedBlock {
        reference: BlockReference::Name {
            block_type_slug,
            block_document_name,
        },
        key_path: parts.next().map(str::to_owned),
    })
}

/// The `$ref` document ID of an object, as Prefect reads it
/// (`tmpl.get("$ref", {}).get("block_document_id")`, used only when truthy).
enum DollarRef<'a> {
    /// No `$ref`, or one without a truthy `block_document_id`: an ordinary object.
    None,
    Id(&'a str),
    /// Prefect would crash on it (`$ref` not a dict) or send it to the API as is
    /// (an ID that is not a string).
    Malformed(String),
}

fn dollar_ref(map: &Map) -> DollarRef<'_> {
    match map.get("$ref") {
        None => DollarRef::None,
        Some(Value::Object(inner)) => match inner.get("block_document_id") {
            Some(Value::String(id)) if !id.is_empty() => DollarRef::Id(id),
            Some(id) if truthy(id) => DollarRef::Malformed(format!(
                "`block_document_id` must be a string, not {}",
                json_type_name(id)
            )),
            _ => DollarRef::None,
        },
        Some(other) => DollarRef::Malformed(format!(
            "`$ref` must be an object, not {}",
            json_type_name(other)
        )),
    }
}

/// The block documents referenced in `config`, each once, in the order Prefect's walk
/// meets them. Malformed references are skipped here; [`resolve_blocks`] reports them.
pub fn block_references(config: &Map) -> Vec<BlockReference> {
    let mut found = Vec::new();
    collect_map(config, &mut found);
    found
}

fn push(found: &mut Vec<BlockReference>, reference: BlockReference) {
    if !found.contains(&reference) {
        found.push(reference);
    }
}

fn collect_map(map: &Map, found: &mut Vec<BlockReference>) {
    match dollar_ref(map) {
        DollarRef::Id(id) => push(found, BlockReference::Id(id.to_owned())),
        DollarRef::Malformed(_) => {}
        DollarRef::None => map.values().for_each(|value| collect(value, found)),
    }
}

fn collect(value: &Value, found: &mut Vec<BlockReference>) {
    match value {
        Value::Object(map) => collect_map(map, found),
        Value::Array(items) => items.iter().for_each(|item| collect(item, found)),
        Value::String(s) => {
            for m in scan(s).filter(|m| m.kind() == PlaceholderType::BlockDocument) {
                if let Some(named) = parse_block_name(m.name) {
                    push(found, named.reference);
                }
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Substitutes block documents in `config`, given each referenced document's `data`:
///
/// * an object with `{"$ref": {"block_document_id": id}}` is replaced by the data
///   (its other keys are dropped; the data is not searched for further references);
/// * a string that is exactly one `{{ prefect.blocks.… }}` placeholder becomes the value
///   with its JSON type; one embedded in text becomes the value's Python `str()`, and
///   an object or list there is an error;
/// * data that is exactly `{"value": …}` (system blocks such as `secret`, `string`,
///   `json`) is unwrapped to that value, unless the key path starts with `value`;
/// * a key path after the document name is looked up like a job variable path
///   (`a.b[0]`), and must exist.
///
/// Other placeholders are left for [`crate::resolve_variables`]. On error `config` may be
/// partly substituted; it should be discarded.
pub fn resolve_blocks(
    config: &mut Map,
    documents: &HashMap<BlockReference, Map>,
) -> Result<(), TemplateError> {
    // Prefect checks the top-level object for `$ref` too.
    if let Some(data) = resolve_ref(config, documents)? {
        *config = data;
        return Ok(());
    }
    for value in config.values_mut() {
        resolve(value, documents)?;
    }
    Ok(())
}

/// The data replacing `map` if it is a `$ref` object.
fn resolve_ref(
    map: &Map,
    documents: &HashMap<BlockReference, Map>,
) -> Result<Option<Map>, TemplateError> {
    match dollar_ref(map) {
        DollarRef::None => Ok(None),
        DollarRef::Id(id) => {
            let reference = BlockReference::Id(id.to_owned());
            documents.get(&reference).cloned().map(Some).ok_or_else(|| {
                TemplateError::BlockNotFound {
                    reference: reference.to_string(),
                }
            })
        }
        DollarRef::Malformed(reason) => Err(TemplateError::InvalidBlockReference {
            template: Value::Object(map.clone()).to_string(),
            reason,
        }),
    }
}

fn resolve(
    value: &mut Value,
    documents: &HashMap<BlockReference, Map>,
) -> Result<(), TemplateError> {
    match value {
        Value::Object(map) => {
            if let Some(data) = resolve_ref(map, documents)? {
                *value = Value::Object(data);
                return Ok(());
            }
            for item in map.values_mut() {
                resolve(item, documents)?;
            }
        }
        Value::Array(items) => {
            for item in items {
                resolve(item, documents)?;
            }
        }
        Value::String(s) => {
            let replacement = match shape(s, PlaceholderType::BlockDocument) {
                Shape::Untouched => return Ok(()),
                Shape::Whole(m) => block_value(m.name, s, documents)?,
                Shape::Embedded => Value::String(replace_each(s, |m| {
                    if m.kind() != PlaceholderType::BlockDocument {
                        return Ok(None);
                    }
                    match block_value(m.name, s, documents)? {
                        value @ (Value::Object(_) | Value::Array(_)) => {
                            Err(TemplateError::InvalidBlockReference {
                                template: Value::String(s.clone()).to_string(),
                                reason: format!(
                                    "block placeholder {} resolved to {}, which cannot be \
                                     used for inline string substitution; resolve a scalar \
                                     attribute instead (e.g. '.value' or '.url')",
                                    m.full_match,
                                    json_type_name(&value)
                                ),
                            })
                        }
                        scalar => Ok(Some(python_str(&scalar))),
                    }
                })?),
            };
            *value = replacement;
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// `_resolve_single_placeholder`: the value a `prefect.blocks.…` placeholder stands for.
fn block_value(
    name: &str,
    template: &str,
    documents: &HashMap<BlockReference, Map>,
) -> Result<Value, TemplateError> {
    let invalid = |reason: String| TemplateError::InvalidBlockReference {
        template: Value::String(template.to_owned()).to_string(),
        reason,
    };
    let named = parse_block_name(name).ok_or_else(|| {
        invalid(format!(
            "`{name}` is not of the form prefect.blocks.<block-type-slug>.<block-document-name>"
        ))
    })?;
    let data = documents
        .get(&named.reference)
        .ok_or_else(|| TemplateError::BlockNotFound {
            reference: named.reference.to_string(),
        })?;
    let addresses_value = named.key_path.as_deref().is_some_and(|path| {
        path == "value" || path.starts_with("value.") || path.starts_with("value[")
    });
    let unwrapped = match data.get("value") {
        Some(inner) if data.len() == 1 && !addresses_value => inner.clone(),
        _ => Value::Object(data.clone()),
    };
    match named.key_path {
        None => Ok(unwrapped),
        Some(path) => get_from_value(&unwrapped, &path).ok_or_else(|| {
            invalid(format!(
                "could not resolve the key path `{path}` in the data of {}",
                named.reference
            ))
        }),
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

    fn named(slug: &str, name: &str) -> BlockReference {
        BlockReference::Name {
            block_type_slug: slug.to_owned(),
            block_document_name: name.to_owned(),
        }
    }

    fn documents() -> HashMap<BlockReference, Map> {
        HashMap::from([
            (named("secret", "token"), map(json!({"value": "s3cr3t"}))),
            (
                named("json", "cfg"),
                map(
                    json!({"value": {"key": {"nested-key": "nested-value"}, "list": [{"list-key": "list-value"}, 1, 2], "values": "inner"}}),
                ),
            ),
            (
                named("aws-credentials", "prod"),
                map(json!({"aws_access_key_id": "AKIA", "region_name": null})),
            ),
            (
                BlockReference::Id("0b0e-id".to_owned()),
                map(json!({"image": "python:3.12", "n": 2})),
            ),
        ])
    }

    fn config() -> Map {
        map(json!({
            "token": "{{ prefect.blocks.secret.token }}",
            "url": "https://x/{{ prefect.blocks.secret.token }}?r={{ prefect.blocks.aws-credentials.prod.region_name }}",
            "creds": "{{ prefect.blocks.aws-credentials.prod }}",
            "nested": "{{ prefect.blocks.json.cfg.key }}",
            "nested_value": "{{ prefect.blocks.json.cfg.key.nested-key }}",
            "list_item": "{{ prefect.blocks.json.cfg.list[0].list-key }}",
            "explicit_value": "{{ prefect.blocks.json.cfg.value.list[1] }}",
            "values_key": "{{ prefect.blocks.json.cfg.values }}",
            "from_ref": [{"$ref": {"block_document_id": "0b0e-id"}, "dropped": 1}],
            "not_a_ref": {"$ref": {"block_document_id": ""}, "x": "{{ prefect.blocks.secret.token }}"},
            "others": "{{ name }} {{ prefect.variables.v }} {{ prefect.blocks.secret.token }}",
        }))
    }

    #[test]
    fn lists_each_reference_once_in_walk_order() {
        assert_eq!(
            block_references(&config()),
            [
                named("secret", "token"),
                named("aws-credentials", "prod"),
                named("json", "cfg"),
                BlockReference::Id("0b0e-id".to_owned()),
            ]
        );
    }

    #[test]
    fn substitutes_documents() {
        let mut config = config();
        resolve_blocks(&mut config, &documents()).unwrap();
        assert_eq!(
            Value::Object(config),
            json!({
                "token": "s3cr3t",
                "url": "https://x/s3cr3t?r=None",
                "creds": {"aws_access_key_id": "AKIA", "region_name": null},
                "nested": {"nested-key": "nested-value"},
                "nested_value": "nested-value",
                "list_item": "list-value",
                "explicit_value": 1,
                "values_key": "inner",
                "from_ref": [{"image": "python:3.12", "n": 2}],
                "not_a_ref": {"$ref": {"block_document_id": ""}, "x": "s3cr3t"},
                "others": "{{ name }} {{ prefect.variables.v }} s3cr3t",
            })
        );
    }

    #[test]
    fn top_level_ref_replaces_the_whole_config() {
        let mut config = map(json!({"$ref": {"block_document_id": "0b0e-id"}, "a": 1}));
        resolve_blocks(&mut config, &documents()).unwrap();
        assert_eq!(
            Value::Object(config),
            json!({"image": "python:3.12", "n": 2})
        );
    }

    #[test]
    fn errors_are_typed() {
        let cases = [
            (
                json!({"x": "{{ prefect.blocks.secret }}"}),
                "InvalidBlockReference",
            ),
            (
                json!({"x": "{{ prefect.blocks.secret.gone }}"}),
                "BlockNotFound",
            ),
            (
                json!({"x": {"$ref": {"block_document_id": "nope"}}}),
                "BlockNotFound",
            ),
            (
                json!({"x": {"$ref": "#/definitions/x"}}),
                "InvalidBlockReference",
            ),
            (
                json!({"x": {"$ref": {"block_document_id": 7}}}),
                "InvalidBlockReference",
            ),
            (
                json!({"x": "{{ prefect.blocks.json.cfg.key.missing }}"}),
                "InvalidBlockReference",
            ),
            (
                json!({"x": "a {{ prefect.blocks.json.cfg.key }}"}),
                "InvalidBlockReference",
            ),
        ];
        for (config, want) in cases {
            let mut config = map(config);
            let err = resolve_blocks(&mut config, &documents()).unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{err:?}");
        }
        let err = resolve_blocks(
            &mut map(json!({"x": "{{ prefect.blocks.secret.gone }}"})),
            &documents(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "block not found: 'gone' of block type 'secret'; it is referenced by the \
             deployment or work pool configuration but no longer exists"
        );
    }
}
