//! The Kubernetes slugs of prefect-kubernetes (`prefect_kubernetes/utilities.py`): Job names,
//! label keys and label values, each python-slugify 9's legacy pipeline with its own pattern of
//! disallowed characters, case rule, length cap and strip rule.
//!
//! The pipeline, in python-slugify's order (`slugify/slugify.py: slugify`):
//! 1. `'` becomes `-`;
//! 2. NFKD, then an ASCII spelling per character (`text-unidecode` in Prefect's environment;
//!    see [`crate::transliterate`]);
//! 3. HTML entities are decoded: named, then decimal, then hexadecimal references (after the
//!    transliteration, so a decoded `é` is not transliterated and ends up as `-`);
//! 4. NFKD again, lowercase when asked, `'` removed, `,` between two digits removed;
//! 5. each run of disallowed characters becomes `-`, runs of `-` collapse, `-` is stripped at
//!    both ends;
//! 6. the length cap: the first `max_length` characters, with `-` stripped again.
//!
//! prefect-kubernetes then strips `_`, `-` and `.` from both ends of label slugs and falls back
//! to the raw text when nothing is left.

use unicode_normalization::UnicodeNormalization;

use crate::entities::html4_entity;
use crate::transliterate::transliterate;

/// `_slugify_name`: the slug of a Job name, lowercase, `[a-z0-9-]`, at most 45 characters so
/// that Kubernetes' `generateName` suffix still fits in 63. `None` when nothing is left
/// (prefect-kubernetes then uses `prefect-job`).
pub fn slugify_name(name: &str) -> Option<String> {
    let slug = slugify(
        name,
        &Rules {
            lowercase: true,
            extra: "-",
            max_length: 45,
        },
    );
    (!slug.is_empty()).then_some(slug)
}

/// `_slugify_label_key`: an optional prefix (before the first `/`, `[A-Za-z0-9.-]`, at most 253
/// characters) and a name (`[A-Za-z0-9._-]`, at most 63), case kept, `_-.` stripped from the
/// ends of each. A part that slugs to nothing stays as it was, so Kubernetes rejects it rather
/// than Prefect inventing a key. An empty prefix (`/name`) is dropped.
pub fn slugify_label_key(key: &str) -> String {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (prefix, name),
        None => ("", key),
    };
    let name_slug = label_part(name, "-_.", 63);
    if prefix.is_empty() {
        return name_slug;
    }
    format!("{}/{name_slug}", label_part(prefix, "-.", 253))
}

/// `_slugify_label_value`: `[A-Za-z0-9._-]`, case kept, at most 63 characters, `_-.` stripped
/// from the ends; the raw value when nothing is left.
pub fn slugify_label_value(value: &str) -> String {
    label_part(value, "-_.", 63)
}

fn label_part(text: &str, extra: &'static str, max_length: usize) -> String {
    let slug = slugify(
        text,
        &Rules {
            lowercase: false,
            extra,
            max_length,
        },
    );
    let trimmed = slug.trim_matches(|c| matches!(c, '_' | '-' | '.'));
    if trimmed.is_empty() {
        text.to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// One use of python-slugify: what survives besides ASCII letters and digits, the case rule
/// and the length cap.
struct Rules {
    lowercase: bool,
    /// ASCII punctuation kept as is (`regex_pattern` is `[^a-zA-Z0-9<extra>]+`).
    extra: &'static str,
    max_length: usize,
}

fn slugify(text: &str, rules: &Rules) -> String {
    let text = text.replace('\'', "-");
    let text = transliterate(&text);
    let text = decode_entities(&text);
    let mut text: String = text.nfkd().collect();
    if rules.lowercase {
        text = text.to_lowercase();
    }
    let text = remove_commas_between_digits(&text.replace('\'', ""));
    let text = collapse_disallowed(&text, rules.extra);
    truncate(&text, rules.max_length)
}

/// python-slugify's legacy entity decoding: named references first, then decimal, then
/// hexadecimal. A numeric pass is all or nothing: one reference out of Unicode's range makes
/// Python's `chr` raise inside `re.sub`, and the whole pass is skipped.
fn decode_entities(text: &str) -> String {
    let text = replace_references(text, "&", |name| {
        name.bytes()
            .all(|b| b.is_ascii_alphanumeric())
            .then(|| html4_entity(name))
            .flatten()
            .map(Ok)
    })
    .and_then(Result::ok)
    .unwrap_or_else(|| text.to_owned());
    let text = numeric_pass(&text, "&#", 10);
    numeric_pass(&text, "&#x", 16)
}

fn numeric_pass(text: &str, prefix: &str, radix: u32) -> String {
    let decoded = replace_references(text, prefix, |digits| {
        if !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        // A value past U+10FFFF (or past u32) is Python's ValueError/OverflowError.
        Some(
            u32::from_str_radix(digits, radix)
                .ok()
                .filter(|v| *v <= 0x10FFFF)
                .ok_or(()),
        )
    });
    match decoded {
        Some(Ok(decoded)) => decoded,
        _ => text.to_owned(),
    }
}

/// Replaces each `{prefix}{body};` whose `lookup(body)` is `Some(Ok(code point))`. `None` when
/// nothing was replaced; `Some(Err(()))` when a lookup failed the pass. A surrogate code point
/// (a lone surrogate in Python, later replaced like any disallowed character) becomes U+FFFD,
/// which is replaced the same way.
fn replace_references(
    text: &str,
    prefix: &str,
    mut lookup: impl FnMut(&str) -> Option<Result<u32, ()>>,
) -> Option<Result<String, ()>> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut replaced = false;
    while let Some(start) = rest.find(prefix) {
        let after = &rest[start + prefix.len()..];
        let body_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        let body = (body_len > 0 && after[body_len..].starts_with(';')).then(|| &after[..body_len]);
        match body.and_then(&mut lookup) {
            Some(Ok(code)) => {
                out.push_str(&rest[..start]);
                out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
                rest = &after[body_len + 1..];
                replaced = true;
            }
            Some(Err(())) => return Some(Err(())),
            None => {
                // Not a reference here: keep the `&` and search on from the next byte.
                out.push_str(&rest[..start + 1]);
                rest = &rest[start + 1..];
            }
        }
    }
    out.push_str(rest);
    replaced.then_some(Ok(out))
}

/// `re.sub(r'(?<=\d),(?=\d)', '', text)`, looking at the original text on both sides. Only
/// ASCII digits are checked: a non-ASCII digit and a comma next to it are both disallowed and
/// collapse into one `-` either way.
fn remove_commas_between_digits(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &ch) in chars.iter().enumerate() {
        let between_digits = ch == ','
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit());
        if !between_digits {
            out.push(ch);
        }
    }
    out
}

/// Runs of characters outside ASCII letters, digits and `extra` become `-`; runs of `-`
/// collapse; `-` is stripped at both ends.
fn collapse_disallowed(text: &str, extra: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        let kept = if ch.is_ascii_alphanumeric() || extra.contains(ch) {
            ch
        } else {
            '-'
        };
        if !(kept == '-' && out.ends_with('-')) {
            out.push(kept);
        }
    }
    out.trim_matches('-').to_owned()
}

/// `smart_truncate` without word boundaries. The text is ASCII by now, so bytes are characters.
fn truncate(text: &str, max_length: usize) -> String {
    if text.len() < max_length {
        return text.to_owned();
    }
    text[..max_length].trim_matches('-').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from prefect-kubernetes 0.8.0 (python-slugify 9.0.0, text-unidecode 1.3).
    #[test]
    fn matches_prefect_on_the_documented_vectors() {
        assert_eq!(slugify_label_value("日本語"), "Ri-Ben-Yu");
        assert_eq!(slugify_name("日本語").as_deref(), Some("ri-ben-yu"));
        assert_eq!(
            slugify_label_value("Ünïcødé flow — test"),
            "Unicode-flow-test"
        );
        assert_eq!(slugify_label_value("x'y\"z"), "x-y-z");
        assert_eq!(slugify_label_value("___"), "___");
        assert_eq!(slugify_name("___"), None);
        assert_eq!(slugify_label_value("My K8s Worker"), "My-K8s-Worker");
        assert_eq!(
            slugify_label_value("2026-10-01T12:00:00+00:00"),
            "2026-10-01T12-00-00-00-00"
        );
        assert_eq!(slugify_name("witty-otter").as_deref(), Some("witty-otter"));
    }

    #[test]
    fn label_keys_split_at_the_first_slash() {
        assert_eq!(
            slugify_label_key("prefect.io/flow-run-id"),
            "prefect.io/flow-run-id"
        );
        assert_eq!(slugify_label_key("a/b/c"), "a/b-c");
        assert_eq!(slugify_label_key("/name"), "name");
        assert_eq!(
            slugify_label_key("ex_ample.com/Owner_"),
            "ex-ample.com/Owner"
        );
        assert_eq!(slugify_label_key("___/___"), "___/___");
    }

    #[test]
    fn caps_apply_after_the_slug_and_strip_again() {
        let name = format!("{}-{}", "a".repeat(44), "b".repeat(10));
        assert_eq!(slugify_name(&name).unwrap(), "a".repeat(44));
        assert_eq!(slugify_label_value(&"x".repeat(70)), "x".repeat(63));
        let value = format!("{}._x", "v".repeat(62));
        assert_eq!(slugify_label_value(&value), "v".repeat(62));
    }

    #[test]
    fn entities_decode_after_transliteration() {
        assert_eq!(slugify_label_value("caf&eacute;s"), "cafe-s");
        assert_eq!(slugify_label_value("&#1114112; x &#65;"), "1114112-x-65");
        assert_eq!(slugify_label_value("&#x41;&#65;"), "AA");
    }
}
