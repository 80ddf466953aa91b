//! Python's `str()` and `repr()` of JSON values, because Prefect embeds a value in
//! surrounding text with `str(value)` (`prefect/utilities/templating/__init__.py:
//! apply_values`) and its pydantic model coerces `env` values with `str()`
//! (`prefect/workers/base.py: BaseJobConfiguration._coerce_env`).
//!
//! So `True`, `None`, `1.0`, `1e+16`, `{'k': [1, None]}` — not JSON.

use std::fmt::Write as _;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Number, Value};

/// Python's `str(value)` for the value json-decoded into Python: a string is itself,
/// everything else is its [`python_repr`].
pub fn python_str(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => python_repr(other),
    }
}

/// Python's `repr(value)` for the value json-decoded into Python
/// (`None`, `True`, `'it\'s'` → `"it's"`, `[1, 'a']`, `{'k': None}`).
pub fn python_repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, &mut out);
    out
}

fn write_repr(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&number_repr(n)),
        Value::String(s) => write_str_repr(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str_repr(key, out);
                out.push_str(": ");
                write_repr(item, out);
            }
            out.push('}');
        }
    }
}

fn number_repr(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        // JSON numbers with a fraction or exponent decode to Python floats.
        float_repr(n.as_f64().unwrap_or(f64::NAN))
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip (Rust's `{:e}` gives the
/// same digits), laid out as CPython's `float_repr_style = 'short'` does — positional
/// when the decimal point falls within `-4 < decpt <= 16`, else `d.ddde±XX`.
pub(crate) fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let sci = format!("{:e}", f.abs());
    let (mantissa, exponent) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    // Position of the decimal point relative to the start of `digits`.
    let decpt = exponent + 1;
    let n = i32::try_from(digits.len()).expect("a float has few digits");
    let body = if decpt <= -4 || decpt > 16 {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp = decpt - 1;
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{first}{frac}e{exp_sign}{:02}", exp.abs())
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat(decpt.unsigned_abs() as usize))
    } else if decpt >= n {
        format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
    } else {
        let (int, frac) = digits.split_at(decpt as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

/// Characters `str.isprintable()` rejects: Unicode categories Cc, Cf, Cs, Co, Cn, Zl, Zp
/// and Zs, except the ASCII space (CPython `Py_UNICODE_ISPRINTABLE`).
static NOT_PRINTABLE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[\p{C}\p{Z}&&[^ ]]$").expect("printable regex is valid"));

fn is_printable(c: char) -> bool {
    let mut buf = [0u8; 4];
    !NOT_PRINTABLE.is_match(c.encode_utf8(&mut buf))
}

/// CPython's `unicode_repr`: single quotes unless the text has a `'` and no `"`.
fn write_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            c if c == quote || c == '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_ascii() || is_printable(c) => out.push(c),
            c if (c as u32) <= 0xff => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_like_python_str() {
        assert_eq!(python_str(&json!(null)), "None");
        assert_eq!(python_str(&json!(true)), "True");
        assert_eq!(python_str(&json!(false)), "False");
        assert_eq!(python_str(&json!(42)), "42");
        assert_eq!(python_str(&json!(-7)), "-7");
        assert_eq!(python_str(&json!(u64::MAX)), "18446744073709551615");
        assert_eq!(python_str(&json!("plain 'text'")), "plain 'text'");
    }

    #[test]
    fn floats_like_python_repr() {
        // Each expectation is CPython 3.11's repr() of the same float.
        let cases = [
            (1.0, "1.0"),
            (1.5, "1.5"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (12345.678, "12345.678"),
            (-2.5e100, "-2.5e+100"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "repr({f:e})");
        }
        assert_eq!(python_str(&json!(2.0)), "2.0");
    }

    #[test]
    fn containers_like_python_repr() {
        let value = json!({"k": [1, true, null, 1.5, "it's", "say \"hi\"", "both '\""], "n": {}});
        assert_eq!(
            python_str(&value),
            r#"{'k': [1, True, None, 1.5, "it's", 'say "hi"', 'both \'"'], 'n': {}}"#
        );
        assert_eq!(python_str(&json!([])), "[]");
    }

    #[test]
    fn string_escapes_like_python_repr() {
        // Expectations from CPython 3.11 repr().
        let cases = [
            ("tab\tnl\ncr\r", r"'tab\tnl\ncr\r'"),
            ("back\\slash", r"'back\\slash'"),
            ("\u{0}\u{1b}\u{7f}", r"'\x00\x1b\x7f'"),
            ("é ü 日本 😀", "'é ü 日本 😀'"),
            ("\u{85}\u{a0}\u{ad}", r"'\x85\xa0\xad'"),
            ("\u{200b}\u{2028}\u{feff}", r"'\u200b\u2028\ufeff'"),
            ("\u{e000}\u{10ffff}", r"'\ue000\U0010ffff'"),
        ];
        for (s, want) in cases {
            assert_eq!(python_repr(&json!(s)), want, "repr({s:?})");
        }
    }
}
