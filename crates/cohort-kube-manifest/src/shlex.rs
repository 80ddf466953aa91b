//! Python's `shlex.split(s)` (POSIX mode, no comments), which turns a string `command` into the
//! container's `args` (`prefect/utilities/processutils: command_from_string`).
//!
//! Its own rules, not a POSIX shell's: whitespace is only space, tab, CR and LF; inside double
//! quotes a backslash escapes only `"` and `\` (so `"\$"` stays `\$`); `''` is an empty word.

/// Python's message for a quote left open.
pub(crate) const NO_CLOSING_QUOTATION: &str = "No closing quotation";
/// Python's message for a backslash at the very end.
pub(crate) const NO_ESCAPED_CHARACTER: &str = "No escaped character";

#[derive(Clone, Copy, PartialEq)]
enum State {
    /// Between words.
    Space,
    /// In a word, outside quotes.
    Word,
    /// Inside `'…'` or `"…"`.
    Quoted(char),
    /// After a backslash; the state to return to.
    Escaped(Escape),
}

#[derive(Clone, Copy, PartialEq)]
enum Escape {
    Word,
    DoubleQuoted,
}

/// The words of `command`, or Python's error message.
pub(crate) fn split(command: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word that had quotes is kept even when empty.
    let mut quoted = false;
    let mut state = State::Space;
    for ch in command.chars() {
        match state {
            State::Space | State::Word => {
                if is_whitespace(ch) {
                    if state == State::Word {
                        words.push(std::mem::take(&mut word));
                        quoted = false;
                    }
                    state = State::Space;
                } else if ch == '\\' {
                    state = State::Escaped(Escape::Word);
                } else if ch == '\'' || ch == '"' {
                    state = State::Quoted(ch);
                } else {
                    word.push(ch);
                    state = State::Word;
                }
            }
            State::Quoted(quote) => {
                quoted = true;
                if ch == quote {
                    state = State::Word;
                } else if ch == '\\' && quote == '"' {
                    state = State::Escaped(Escape::DoubleQuoted);
                } else {
                    word.push(ch);
                }
            }
            State::Escaped(back) => {
                if back == Escape::DoubleQuoted && ch != '"' && ch != '\\' {
                    word.push('\\');
                }
                word.push(ch);
                state = match back {
                    Escape::Word => State::Word,
                    Escape::DoubleQuoted => State::Quoted('"'),
                };
            }
        }
    }
    match state {
        State::Quoted(_) => return Err(NO_CLOSING_QUOTATION),
        State::Escaped(_) => return Err(NO_ESCAPED_CHARACTER),
        State::Word => words.push(word),
        State::Space if quoted => words.push(word),
        State::Space => {}
    }
    Ok(words)
}

fn is_whitespace(ch: char) -> bool {
    matches!(ch, ' ' | '\t' | '\r' | '\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expectations from Python 3.11's `shlex.split`.
    #[test]
    fn splits_like_python() {
        let cases: &[(&str, &[&str])] = &[
            (
                "prefect flow-run execute",
                &["prefect", "flow-run", "execute"],
            ),
            ("  a\tb\n", &["a", "b"]),
            ("'a b' \"c d\" e\\ f", &["a b", "c d", "e f"]),
            (
                "\"x\\$y\" \"q\\\"r\" \"s\\\\t\"",
                &["x\\$y", "q\"r", "s\\t"],
            ),
            ("'a\\b'", &["a\\b"]),
            ("'' \"\" x''", &["", "", "x"]),
            ("a'b'\"c\"d", &["abcd"]),
            ("a\u{b}b", &["a\u{b}b"]),
            ("#not-a-comment", &["#not-a-comment"]),
            ("", &[]),
        ];
        for (input, want) in cases {
            assert_eq!(split(input).unwrap(), *want, "{input:?}");
        }
    }

    #[test]
    fn open_quotes_and_trailing_backslashes_fail_like_python() {
        assert_eq!(split("echo 'oops"), Err(NO_CLOSING_QUOTATION));
        assert_eq!(split("echo \"oops\\\""), Err(NO_CLOSING_QUOTATION));
        assert_eq!(split("echo \\"), Err(NO_ESCAPED_CHARACTER));
    }
}
