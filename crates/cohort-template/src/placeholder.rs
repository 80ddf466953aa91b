//! Placeholder syntax: finding `{{ name }}` in strings and classifying it, mirroring
//! `prefect/utilities/templating/__init__.py` (`PLACEHOLDER_CAPTURE_REGEX`,
//! `determine_placeholder_type`, `find_placeholders`).

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

/// Names starting with this are block document references, resolved by [`crate::resolve_blocks`].
pub(crate) const BLOCK_DOCUMENT_PREFIX: &str = "prefect.blocks.";
/// Names starting with this are Prefect variables, resolved by [`crate::resolve_variables`].
pub(crate) const VARIABLE_PREFIX: &str = "prefect.variables.";
/// Names starting with this read the worker's environment.
pub(crate) const ENV_VAR_PREFIX: char = '$';

/// Prefect's `{{\s*([\w\.\-\[\]$]+)\s*}}`, spelled so that Rust's regex classes match
/// what Python's `re` matches on `str`: Python's `\w` is `str.isalnum()` or `_`
/// (letters and all numerics, but no combining marks or connector punctuation, which
/// Rust's `\w` has), and Python's `\s` also covers the separators U+001C..U+001F.
static PLACEHOLDER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\{\{[\s\x1C-\x1F]*([\p{L}\p{N}_.\-\[\]$]+)[\s\x1C-\x1F]*\}\}")
        .expect("placeholder regex is valid")
});

/// What a placeholder refers to, decided by its name's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlaceholderType {
    /// A job variable, e.g. `{{ env }}` or `{{ image.tag }}`; filled by [`crate::render`].
    Standard,
    /// `{{ prefect.blocks.<slug>.<name>[.<key path>] }}`; filled by [`crate::resolve_blocks`].
    BlockDocument,
    /// `{{ prefect.variables.<name> }}`; filled by [`crate::resolve_variables`].
    Variable,
    /// `{{ $NAME }}`, the worker's environment variable `NAME`; filled by [`crate::render`].
    EnvVar,
}

impl PlaceholderType {
    /// Classifies a placeholder name (`determine_placeholder_type`).
    pub fn of(name: &str) -> Self {
        if name.starts_with(BLOCK_DOCUMENT_PREFIX) {
            Self::BlockDocument
        } else if name.starts_with(VARIABLE_PREFIX) {
            Self::Variable
        } else if name.starts_with(ENV_VAR_PREFIX) {
            Self::EnvVar
        } else {
            Self::Standard
        }
    }
}

/// One placeholder found in a template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Placeholder {
    /// The whole match, braces and inner whitespace included (`{{ env }}`).
    pub full_match: String,
    /// The name between the braces (`env`).
    pub name: String,
    /// What the name refers to.
    pub kind: PlaceholderType,
}

/// All distinct placeholders in the string values of `template` (recursing through
/// objects and lists; object keys are never templated), in order of first appearance.
///
/// Prefect returns a `set`; we keep first-appearance order so results are deterministic.
pub fn find_placeholders(template: &Value) -> Vec<Placeholder> {
    let mut found = Vec::new();
    collect(template, &mut found);
    found
}

fn collect(template: &Value, found: &mut Vec<Placeholder>) {
    match template {
        Value::String(s) => {
            for m in scan(s) {
                let placeholder = m.to_placeholder();
                if !found.contains(&placeholder) {
                    found.push(placeholder);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect(item, found)),
        Value::Object(map) => map.values().for_each(|value| collect(value, found)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// One regex match inside a string.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Match<'a> {
    pub(crate) full_match: &'a str,
    pub(crate) name: &'a str,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

impl Match<'_> {
    pub(crate) fn kind(&self) -> PlaceholderType {
        PlaceholderType::of(self.name)
    }

    /// Whether this match is the whole of `s`.
    pub(crate) fn spans(&self, s: &str) -> bool {
        self.start == 0 && self.end == s.len()
    }

    fn to_placeholder(self) -> Placeholder {
        Placeholder {
            full_match: self.full_match.to_owned(),
            name: self.name.to_owned(),
            kind: self.kind(),
        }
    }
}

/// The placeholder matches in `s`, left to right, non-overlapping (as `re.findall`).
pub(crate) fn scan(s: &str) -> impl Iterator<Item = Match<'_>> {
    PLACEHOLDER.captures_iter(s).map(|caps| {
        let whole = caps.get(0).expect("group 0 always matches");
        Match {
            full_match: whole.as_str(),
            name: caps.get(1).expect("group 1 is not optional").as_str(),
            start: whole.start(),
            end: whole.end(),
        }
    })
}

/// How a string relates to the placeholders of one kind (`wanted`).
pub(crate) enum Shape<'a> {
    /// No placeholder of the wanted kind: leave the string alone.
    Untouched,
    /// The string is exactly one placeholder of the wanted kind, which Prefect replaces
    /// by the raw value (any JSON type) rather than by text.
    Whole(Match<'a>),
    /// Placeholders are embedded in text (or several): each wanted one is replaced by
    /// the value's Python `str()`.
    Embedded,
}

/// Decides how Prefect treats `s` for placeholders of kind `wanted`.
///
/// Prefect's test is "the set of *all* placeholders has one element, it equals the whole
/// string, and it is of the wanted kind"; a single match spanning the string is the
/// same thing.
pub(crate) fn shape(s: &str, wanted: PlaceholderType) -> Shape<'_> {
    let mut matches = scan(s).peekable();
    let Some(first) = matches.peek().copied() else {
        return Shape::Untouched;
    };
    if first.spans(s) {
        return if first.kind() == wanted {
            Shape::Whole(first)
        } else {
            Shape::Untouched
        };
    }
    if matches.any(|m| m.kind() == wanted) {
        Shape::Embedded
    } else {
        Shape::Untouched
    }
}

/// Replaces every placeholder in `s` in a single left-to-right pass: `replace` returns
/// the text for a match, or `None` to keep the match as it is.
///
/// Prefect instead calls `str.replace` once per distinct placeholder, in `set` order
/// (which varies with Python's hash seed), so a value that itself contains another
/// placeholder's text may or may not be substituted again. One pass never re-substitutes,
/// which is deterministic and agrees with Prefect whenever values hold no placeholders.
pub(crate) fn replace_each<E>(
    s: &str,
    mut replace: impl FnMut(Match<'_>) -> Result<Option<String>, E>,
) -> Result<String, E> {
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for m in scan(s) {
        out.push_str(&s[last..m.start]);
        match replace(m)? {
            Some(text) => out.push_str(&text),
            None => out.push_str(m.full_match),
        }
        last = m.end;
    }
    out.push_str(&s[last..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(s: &str) -> Vec<&str> {
        scan(s).map(|m| m.name).collect()
    }

    #[test]
    fn matches_like_python_re() {
        // Expectations from Python 3.11 `re.findall` with Prefect's pattern.
        assert_eq!(names("{{ ²a }}"), ["²a"]);
        assert!(
            names("{{ a\u{0301} }}").is_empty(),
            "combining mark is not \\w in Python"
        );
        assert!(
            names("{{ a\u{203F}b }}").is_empty(),
            "connector punctuation is not \\w"
        );
        assert_eq!(names("{{\u{1c}a\u{1f}}}"), ["a"]);
        assert_eq!(names("{{{ a }}}"), ["a"]);
        assert_eq!(names("{{ a\u{a0}}}"), ["a"]);
        assert_eq!(names("{{a.b[0]-c$}}x{{ $HOME }}"), ["a.b[0]-c$", "$HOME"]);
        assert!(names("{{ a b }}").is_empty());
        assert!(names("{{ }}").is_empty());
        assert!(names("{ { a } }").is_empty());
    }

    #[test]
    fn classifies_by_prefix() {
        assert_eq!(PlaceholderType::of("env"), PlaceholderType::Standard);
        assert_eq!(PlaceholderType::of("$HOME"), PlaceholderType::EnvVar);
        assert_eq!(PlaceholderType::of("a$b"), PlaceholderType::Standard);
        assert_eq!(
            PlaceholderType::of("prefect.variables.x"),
            PlaceholderType::Variable
        );
        assert_eq!(
            PlaceholderType::of("prefect.blocks.secret.x"),
            PlaceholderType::BlockDocument
        );
        // The prefix includes the trailing dot.
        assert_eq!(
            PlaceholderType::of("prefect.variables"),
            PlaceholderType::Standard
        );
    }

    #[test]
    fn find_placeholders_walks_values_not_keys_and_dedups() {
        let template = json!({
            "{{ key }}": "{{ a }}",
            "list": ["x {{ b }}", 1, null, true, {"deep": "{{ a }}{{ $E }}"}],
        });
        let found: Vec<_> = find_placeholders(&template)
            .into_iter()
            .map(|p| (p.name, p.kind))
            .collect();
        assert_eq!(
            found,
            [
                ("a".to_owned(), PlaceholderType::Standard),
                ("b".to_owned(), PlaceholderType::Standard),
                ("$E".to_owned(), PlaceholderType::EnvVar),
            ]
        );
    }

    #[test]
    fn shape_requires_the_single_placeholder_to_span_the_string() {
        assert!(matches!(
            shape("{{ a }}", PlaceholderType::Standard),
            Shape::Whole(_)
        ));
        assert!(matches!(
            shape("{{a}}", PlaceholderType::Standard),
            Shape::Whole(_)
        ));
        assert!(matches!(
            shape(" {{ a }}", PlaceholderType::Standard),
            Shape::Embedded
        ));
        assert!(matches!(
            shape("{{ a }}{{ a }}", PlaceholderType::Standard),
            Shape::Embedded
        ));
        assert!(matches!(
            shape("{{ $A }}", PlaceholderType::Standard),
            Shape::Untouched
        ));
        assert!(matches!(
            shape("{{ $A }}", PlaceholderType::EnvVar),
            Shape::Whole(_)
        ));
        assert!(matches!(
            shape("plain", PlaceholderType::Standard),
            Shape::Untouched
        ));
    }
}
