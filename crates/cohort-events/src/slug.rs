//! `slugify`: python-slugify 9.0.0's default ("legacy") pipeline, as Prefect uses it for
//! worker and runner resource ids (`prefect/utilities/slugify.py`, `slugify/slugify.py`).
//!
//! Steps, in python-slugify's order (the order matters: entities are decoded *after*
//! transliteration, so `caf&eacute;s` becomes `cafe-s`, not `cafes`):
//! 1. `'` becomes `-`;
//! 2. NFKD, then transliteration to ASCII (python-slugify picks `text-unidecode` in Prefect's
//!    environment; we use `deunicode`, which agrees with it on Latin, Greek, Cyrillic, Hangul,
//!    kana and common CJK — see the tests — plus `text-unidecode`'s rules for what it drops);
//! 3. HTML entities: named (HTML 4 names), then decimal, then hexadecimal references;
//! 4. NFKD again, lowercase, remove `'`, remove `,` between two digits (`1,000` -> `1000`);
//! 5. every run of characters outside `[-a-zA-Z0-9]` becomes `-`, runs of `-` collapse,
//!    leading and trailing `-` go.
//!
//! Known gap: transliteration tables differ on rare characters. Checked one code point at a
//! time against Prefect's environment, about 12,000 of the 65,000 BMP code points slug
//! differently — CJK Extension A, Yi, historic scripts, some symbols, a handful of rare Latin
//! letters (`Ɂ`, `Ỻ`, …) — while ASCII, Latin-1, Latin Extended-A, Vietnamese, Greek,
//! Cyrillic, Hangul, kana and 98% of the common CJK ideographs agree.

use unicode_normalization::UnicodeNormalization;

/// Slug of `text` exactly as `slugify(text)` with python-slugify's defaults.
pub fn slugify(text: &str) -> String {
    let text = text.replace('\'', "-");
    let text = transliterate(&text);
    let text = decode_entities(&text);
    let text: String = text
        .nfkd()
        .collect::<String>()
        .to_lowercase()
        .replace('\'', "");
    let text = remove_commas_between_digits(&text);
    collapse_disallowed(&text)
}

/// NFKD, then an ASCII spelling per character (see [`ascii_spelling`]).
fn transliterate(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.nfkd() {
        if ch.is_ascii() {
            out.push(ch);
        } else {
            out.push_str(ascii_spelling(ch));
        }
    }
    out
}

/// `text-unidecode`'s spelling where it matters and `deunicode` differs, else `deunicode`'s;
/// characters neither knows become `[?]`, as in `text-unidecode`'s table (then `-`).
fn ascii_spelling(ch: char) -> &'static str {
    match ch {
        // Japanese: the combining semi-voiced mark (from NFKD of パ) and the katakana
        // middle dot vanish in `text-unidecode`, so `パン` slugs to `han` as in Prefect, not `ha-n`.
        '\u{309A}' | '\u{30FB}' => "",
        // `text-unidecode`'s table stops at U+FFFF; anything beyond (emoji, rare CJK) is
        // dropped, where `deunicode` would spell emoji out.
        _ if u32::from(ch) > 0xFFFF => "",
        _ => deunicode::deunicode_char(ch).unwrap_or("[?]"),
    }
}

/// python-slugify's legacy `_decode_entities`: named references first, then decimal, then
/// hexadecimal. A numeric pass is all-or-nothing: if any reference in the text is out of
/// range, that whole pass leaves the text untouched (Python's `chr` raising inside `re.sub`).
fn decode_entities(text: &str) -> String {
    let text = replace_references(text, "&", |name| {
        HTML4_ENTITIES
            .binary_search_by(|(n, _)| n.cmp(&name))
            .ok()
            .map(|i| HTML4_ENTITIES[i].1)
    })
    .unwrap_or_else(|| text.to_owned());
    let text = numeric_pass(&text, "&#", |digits| {
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse::<u32>().ok())
    });
    numeric_pass(&text, "&#x", |digits| {
        digits
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then(|| u32::from_str_radix(digits, 16).ok())
    })
}

/// One numeric reference pass. `parse` returns `None` when the text between the prefix and
/// `;` is not a reference at all, `Some(None)` when it is one whose value cannot be a
/// character (the whole pass is then abandoned).
fn numeric_pass(text: &str, prefix: &str, parse: impl Fn(&str) -> Option<Option<u32>>) -> String {
    let mut out_of_range = false;
    let decoded = replace_references(text, prefix, |digits| match parse(digits)? {
        Some(value) if value <= 0x10FFFF => Some(value),
        _ => {
            out_of_range = true;
            None
        }
    });
    match decoded {
        Some(decoded) if !out_of_range => decoded,
        _ => text.to_owned(),
    }
}

/// Replaces `{prefix}{body};` where `lookup(body)` yields a code point. Returns `None` when
/// nothing was replaced. Surrogate code points (Python would produce a lone surrogate, which
/// later becomes `-` like any other disallowed character) become U+FFFD, which does the same.
fn replace_references(
    text: &str,
    prefix: &str,
    mut lookup: impl FnMut(&str) -> Option<u32>,
) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut replaced = false;
    while let Some(start) = rest.find(prefix) {
        let after = &rest[start + prefix.len()..];
        let body_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        let candidate =
            (body_len > 0 && after[body_len..].starts_with(';')).then(|| &after[..body_len]);
        match candidate.and_then(&mut lookup) {
            Some(code) => {
                out.push_str(&rest[..start]);
                out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
                rest = &after[body_len + 1..];
                replaced = true;
            }
            None => {
                // Not a reference here; keep the prefix's first byte (`&`) and search on.
                out.push_str(&rest[..start + 1]);
                rest = &rest[start + 1..];
            }
        }
    }
    out.push_str(rest);
    replaced.then_some(out)
}

/// `re.sub(r'(?<=\d),(?=\d)', '', text)`: the look-arounds see the original text, so in
/// `1,2,3` both commas go. Only ASCII digits are checked: a non-ASCII digit is itself turned
/// into `-` later, so treating it as a digit here could not change the slug.
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

/// `[^-a-zA-Z0-9]+` -> `-`, then `-{2,}` -> `-`, then strip `-`.
fn collapse_disallowed(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        let keep = if ch.is_ascii_alphanumeric() { ch } else { '-' };
        if !(keep == '-' && out.ends_with('-')) {
            out.push(keep);
        }
    }
    out.trim_matches('-').to_owned()
}

/// The HTML 4 character entity names (Python's `html.entities.name2codepoint`, which
/// python-slugify matches), sorted by name for binary search.
const HTML4_ENTITIES: &[(&str, u32)] = &[
    ("AElig", 0xC6),
    ("Aacute", 0xC1),
    ("Acirc", 0xC2),
    ("Agrave", 0xC0),
    ("Alpha", 0x391),
    ("Aring", 0xC5),
    ("Atilde", 0xC3),
    ("Auml", 0xC4),
    ("Beta", 0x392),
    ("Ccedil", 0xC7),
    ("Chi", 0x3A7),
    ("Dagger", 0x2021),
    ("Delta", 0x394),
    ("ETH", 0xD0),
    ("Eacute", 0xC9),
    ("Ecirc", 0xCA),
    ("Egrave", 0xC8),
    ("Epsilon", 0x395),
    ("Eta", 0x397),
    ("Euml", 0xCB),
    ("Gamma", 0x393),
    ("Iacute", 0xCD),
    ("Icirc", 0xCE),
    ("Igrave", 0xCC),
    ("Iota", 0x399),
    ("Iuml", 0xCF),
    ("Kappa", 0x39A),
    ("Lambda", 0x39B),
    ("Mu", 0x39C),
    ("Ntilde", 0xD1),
    ("Nu", 0x39D),
    ("OElig", 0x152),
    ("Oacute", 0xD3),
    ("Ocirc", 0xD4),
    ("Ograve", 0xD2),
    ("Omega", 0x3A9),
    ("Omicron", 0x39F),
    ("Oslash", 0xD8),
    ("Otilde", 0xD5),
    ("Ouml", 0xD6),
    ("Phi", 0x3A6),
    ("Pi", 0x3A0),
    ("Prime", 0x2033),
    ("Psi", 0x3A8),
    ("Rho", 0x3A1),
    ("Scaron", 0x160),
    ("Sigma", 0x3A3),
    ("THORN", 0xDE),
    ("Tau", 0x3A4),
    ("Theta", 0x398),
    ("Uacute", 0xDA),
    ("Ucirc", 0xDB),
    ("Ugrave", 0xD9),
    ("Upsilon", 0x3A5),
    ("Uuml", 0xDC),
    ("Xi", 0x39E),
    ("Yacute", 0xDD),
    ("Yuml", 0x178),
    ("Zeta", 0x396),
    ("aacute", 0xE1),
    ("acirc", 0xE2),
    ("acute", 0xB4),
    ("aelig", 0xE6),
    ("agrave", 0xE0),
    ("alefsym", 0x2135),
    ("alpha", 0x3B1),
    ("amp", 0x26),
    ("and", 0x2227),
    ("ang", 0x2220),
    ("aring", 0xE5),
    ("asymp", 0x2248),
    ("atilde", 0xE3),
    ("auml", 0xE4),
    ("bdquo", 0x201E),
    ("beta", 0x3B2),
    ("brvbar", 0xA6),
    ("bull", 0x2022),
    ("cap", 0x2229),
    ("ccedil", 0xE7),
    ("cedil", 0xB8),
    ("cent", 0xA2),
    ("chi", 0x3C7),
    ("circ", 0x2C6),
    ("clubs", 0x2663),
    ("cong", 0x2245),
    ("copy", 0xA9),
    ("crarr", 0x21B5),
    ("cup", 0x222A),
    ("curren", 0xA4),
    ("dArr", 0x21D3),
    ("dagger", 0x2020),
    ("darr", 0x2193),
    ("deg", 0xB0),
    ("delta", 0x3B4),
    ("diams", 0x2666),
    ("divide", 0xF7),
    ("eacute", 0xE9),
    ("ecirc", 0xEA),
    ("egrave", 0xE8),
    ("empty", 0x2205),
    ("emsp", 0x2003),
    ("ensp", 0x2002),
    ("epsilon", 0x3B5),
    ("equiv", 0x2261),
    ("eta", 0x3B7),
    ("eth", 0xF0),
    ("euml", 0xEB),
    ("euro", 0x20AC),
    ("exist", 0x2203),
    ("fnof", 0x192),
    ("forall", 0x2200),
    ("frac12", 0xBD),
    ("frac14", 0xBC),
    ("frac34", 0xBE),
    ("frasl", 0x2044),
    ("gamma", 0x3B3),
    ("ge", 0x2265),
    ("gt", 0x3E),
    ("hArr", 0x21D4),
    ("harr", 0x2194),
    ("hearts", 0x2665),
    ("hellip", 0x2026),
    ("iacute", 0xED),
    ("icirc", 0xEE),
    ("iexcl", 0xA1),
    ("igrave", 0xEC),
    ("image", 0x2111),
    ("infin", 0x221E),
    ("int", 0x222B),
    ("iota", 0x3B9),
    ("iquest", 0xBF),
    ("isin", 0x2208),
    ("iuml", 0xEF),
    ("kappa", 0x3BA),
    ("lArr", 0x21D0),
    ("lambda", 0x3BB),
    ("lang", 0x2329),
    ("laquo", 0xAB),
    ("larr", 0x2190),
    ("lceil", 0x2308),
    ("ldquo", 0x201C),
    ("le", 0x2264),
    ("lfloor", 0x230A),
    ("lowast", 0x2217),
    ("loz", 0x25CA),
    ("lrm", 0x200E),
    ("lsaquo", 0x2039),
    ("lsquo", 0x2018),
    ("lt", 0x3C),
    ("macr", 0xAF),
    ("mdash", 0x2014),
    ("micro", 0xB5),
    ("middot", 0xB7),
    ("minus", 0x2212),
    ("mu", 0x3BC),
    ("nabla", 0x2207),
    ("nbsp", 0xA0),
    ("ndash", 0x2013),
    ("ne", 0x2260),
    ("ni", 0x220B),
    ("not", 0xAC),
    ("notin", 0x2209),
    ("nsub", 0x2284),
    ("ntilde", 0xF1),
    ("nu", 0x3BD),
    ("oacute", 0xF3),
    ("ocirc", 0xF4),
    ("oelig", 0x153),
    ("ograve", 0xF2),
    ("oline", 0x203E),
    ("omega", 0x3C9),
    ("omicron", 0x3BF),
    ("oplus", 0x2295),
    ("or", 0x2228),
    ("ordf", 0xAA),
    ("ordm", 0xBA),
    ("oslash", 0xF8),
    ("otilde", 0xF5),
    ("otimes", 0x2297),
    ("ouml", 0xF6),
    ("para", 0xB6),
    ("part", 0x2202),
    ("permil", 0x2030),
    ("perp", 0x22A5),
    ("phi", 0x3C6),
    ("pi", 0x3C0),
    ("piv", 0x3D6),
    ("plusmn", 0xB1),
    ("pound", 0xA3),
    ("prime", 0x2032),
    ("prod", 0x220F),
    ("prop", 0x221D),
    ("psi", 0x3C8),
    ("quot", 0x22),
    ("rArr", 0x21D2),
    ("radic", 0x221A),
    ("rang", 0x232A),
    ("raquo", 0xBB),
    ("rarr", 0x2192),
    ("rceil", 0x2309),
    ("rdquo", 0x201D),
    ("real", 0x211C),
    ("reg", 0xAE),
    ("rfloor", 0x230B),
    ("rho", 0x3C1),
    ("rlm", 0x200F),
    ("rsaquo", 0x203A),
    ("rsquo", 0x2019),
    ("sbquo", 0x201A),
    ("scaron", 0x161),
    ("sdot", 0x22C5),
    ("sect", 0xA7),
    ("shy", 0xAD),
    ("sigma", 0x3C3),
    ("sigmaf", 0x3C2),
    ("sim", 0x223C),
    ("spades", 0x2660),
    ("sub", 0x2282),
    ("sube", 0x2286),
    ("sum", 0x2211),
    ("sup", 0x2283),
    ("sup1", 0xB9),
    ("sup2", 0xB2),
    ("sup3", 0xB3),
    ("supe", 0x2287),
    ("szlig", 0xDF),
    ("tau", 0x3C4),
    ("there4", 0x2234),
    ("theta", 0x3B8),
    ("thetasym", 0x3D1),
    ("thinsp", 0x2009),
    ("thorn", 0xFE),
    ("tilde", 0x2DC),
    ("times", 0xD7),
    ("trade", 0x2122),
    ("uArr", 0x21D1),
    ("uacute", 0xFA),
    ("uarr", 0x2191),
    ("ucirc", 0xFB),
    ("ugrave", 0xF9),
    ("uml", 0xA8),
    ("upsih", 0x3D2),
    ("upsilon", 0x3C5),
    ("uuml", 0xFC),
    ("weierp", 0x2118),
    ("xi", 0x3BE),
    ("yacute", 0xFD),
    ("yen", 0xA5),
    ("yuml", 0xFF),
    ("zeta", 0x3B6),
    ("zwj", 0x200D),
    ("zwnj", 0x200C),
];

#[cfg(test)]
mod tests {
    use super::slugify;

    /// `(input, slugify(input))` pairs produced by Prefect 3.8.8's own environment
    /// (python-slugify 9.0.0 with text-unidecode 1.3).
    const PYTHON_SLUGS: &[(&str, &str)] = &[
        ("My Worker 1", "my-worker-1"),
        (
            "ProcessWorker 7f1c2e3a-59b4-4b8e-9a43-1d0c7e0e3c11",
            "processworker-7f1c2e3a-59b4-4b8e-9a43-1d0c7e0e3c11",
        ),
        ("my_worker.v2", "my-worker-v2"),
        ("Worker#1", "worker-1"),
        ("Über wörker", "uber-worker"),
        ("中文", "zhong-wen"),
        ("it's", "it-s"),
        ("It's a Worker's pool", "it-s-a-worker-s-pool"),
        ("caf&eacute;s", "cafe-s"),
        ("&amp;&#38;&#x26;", ""),
        ("1,000 and 1,2,3", "1000-and-123"),
        ("a,b", "a-b"),
        ("1,a", "1-a"),
        ("a,1", "a-1"),
        (",1,", "1"),
        ("1,,2", "1-2"),
        ("&#1114112; x &#65;", "1114112-x-65"),
        ("&#x110000; &#x41;", "x110000-x41"),
        ("ß", "ss"),
        ("Æther", "aether"),
        ("ﬁle", "file"),
        ("Ⅻ", "xii"),
        ("①", "1"),
        ("½", "1-2"),
        ("x²", "x2"),
        ("€100", "eur100"),
        ("naïve café", "naive-cafe"),
        ("Привет мир", "privet-mir"),
        ("Ελληνικά", "ellenika"),
        ("日本語テキスト", "ri-ben-yu-tekisuto"),
        ("パン", "han"),
        ("カタカナ・テスト", "katakanatesuto"),
        ("한국어", "hangugeo"),
        ("ǅ", "dz"),
        ("&lt;tag&gt;", "tag"),
        ("&nbsp;x", "x"),
        ("--a--b--", "a-b"),
        ("   ", ""),
        ("", ""),
        ("&#55296;x", "x"),
        ("İstanbul", "istanbul"),
        ("ŁÓDŹ", "lodz"),
        ("Đà Nẵng", "da-nang"),
        ("K", "k"),
        ("\u{212a}", "k"),
        ("a\u{301}", "a"),
        ("ProcessWorker", "processworker"),
        ("UPPER lower MiXeD", "upper-lower-mixed"),
        ("tabs\tand\nnewlines", "tabs-and-newlines"),
        ("under_score__double", "under-score-double"),
        ("dots...and---dashes", "dots-and-dashes"),
        ("slash/and\\backslash", "slash-and-backslash"),
        ("percent%sign", "percent-sign"),
        ("quote\"double\"", "quote-double"),
        ("back`tick`", "back-tick"),
        ("(parens) [brackets] {braces}", "parens-brackets-braces"),
        ("email@example.com", "email-example-com"),
        ("http://example.com/path?q=1", "http-example-com-path-q-1"),
        ("k8s-worker-prod-01", "k8s-worker-prod-01"),
        ("docker:worker", "docker-worker"),
        ("worker 😀 smile", "worker-smile"),
        ("Crème Brûlée", "creme-brulee"),
        ("façade", "facade"),
        ("smørrebrød", "smorrebrod"),
        ("Ærøskøbing", "aeroskobing"),
        ("Œuvre", "oeuvre"),
        ("Ångström", "angstrom"),
        ("Zürich", "zurich"),
        ("São Paulo", "sao-paulo"),
        ("Kraków", "krakow"),
        ("Ðorđe", "dorde"),
        ("ĳssel", "ijssel"),
        ("Straße", "strasse"),
        ("ﬀ ligature", "ff-ligature"),
        ("Ｆｕｌｌｗｉｄｔｈ", "fullwidth"),
        ("㍿", "zhu-shi-hui-she"),
        ("™ ® ©", "tm-r-c"),
        ("&copy; 2024", "2024"),
        ("&COPY; upper", "copy-upper"),
        ("&eacute", "eacute"),
        ("&#65", "65"),
        ("&#x41", "x41"),
        ("&#X41;", "x41"),
        ("&#0065;", "a"),
        ("&#x0041;", "a"),
        ("&amp;amp;", "amp"),
        ("&sup1;&sup2;", "12"),
        ("&frac12; cup", "1-2-cup"),
        ("&hellip;end", "end"),
        ("3,14159", "314159"),
        ("1,000,000 dollars", "1000000-dollars"),
        ("v1.2.3", "v1-2-3"),
        ("1.000,50", "1-00050"),
        ("  leading and trailing  ", "leading-and-trailing"),
        ("---", ""),
        ("a-b-c", "a-b-c"),
        ("A_B_C", "a-b-c"),
        ("Ünïcödé Wörkér Nämé", "unicode-worker-name"),
        ("Γειά σου Κόσμε", "geia-sou-kosme"),
        ("Здравствуй, мир!", "zdravstvui-mir"),
        ("北京市", "bei-jing-shi"),
        ("東京都", "dong-jing-du"),
        ("서울특별시", "seoulteugbyeolsi"),
        ("ภาษาไทย", "phaasaaaithy"),
        ("हिन्दी", "hindii"),
        ("שלום", "shlvm"),
        ("مرحبا", "mrhb"),
        ("Tiếng Việt", "tieng-viet"),
        ("Türkçe İ ı ş ğ", "turkce-i-i-s-g"),
        ("Čeština ěščřžýáíé", "cestina-escrzyaie"),
        ("Polski ąćęłńóśźż", "polski-acelnoszz"),
        ("Română ăâîșț", "romana-aaist"),
        ("O'Brien", "o-brien"),
        ("rock'n'roll", "rock-n-roll"),
        ("'quoted'", "quoted"),
        ("‘curly’ “quotes”", "curly-quotes"),
        ("en–dash em—dash", "en-dash-em-dash"),
        ("bullet • point", "bullet-point"),
        ("no·break", "no-break"),
    ];

    const SAMPLED: &str = concat!(
        "\u{a0}¡¢£¤¥¦§¨©ª«¬\u{ad}®¯°±²³´µ¶·¸¹º»¼½¾¿ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖ×ØÙÚÛ",
        "ÜÝÞßàáâãäåæçèéêëìíîïðñòóôõö÷øùúûüýþÿĀāĂăĄąĆćĈĉĊċČčĎďĐđĒēĔĕĖėĘęĚěĜĝĞğĠġ",
        "ĢģĤĥĦħĨĩĪīĬĭĮįİıĲĳĴĵĶķĸĹĺĻļĽľĿŀŁłŃńŅņŇňŉŊŋŌōŎŏŐőŒœŔŕŖŗŘřŚśŜŝŞşŠšŢţŤťŦŧ",
        "ŨũŪūŬŭŮůŰűŲųŴŵŶŷŸŹźŻżŽžſΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩΪΫάέήίΰαβγδεζηθικλμνξο",
        "πρςστυφχψωЀЁЂЃЄЅІЇЈЉЊЋЌЍЎЏАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдежзийкл",
        "мнопрстуфхцчшщъыьэюяѐёђѓєѕіїјљњћќѝўџぁあぃいぅうぇえぉおかがきぎくぐけげこごさざしじすずせぜそぞただちぢ",
        "っつづてでとどなにぬねのはばぱひびぴふぶぷへべぺほぼぽまみむめもゃやゅゆょよらりるれろゎわゐゑをんゔァアィイゥウェエォオカガキギクグケゲコゴ",
        "サザシジスズセゼソゾタダチヂッツヅテデトドナニヌネノハバパヒビピフブプヘベペホボポマミムメモャヤュユョヨラリルレロヮワヰヱヲンヴヵヶヷヸヹヺ",
        "가각갂갃간갅갆갇갈갉갊갋갌갍갎갏감갑값갓갔강갖갗갘같갚갛개객갞갟갠갡갢갣갤갥갦갧갨갩갪갫갬갭갮갯갰갱갲갳갴갵갶갷갸갹갺갻갼갽갾갿一丁丂七丄丅",
        "万丈三上下丌不与丏丐丑丒专且丕世丗丘丙业丛东丝丞丟丠両丢丣两严並丧丨丩个丫丬中丮丯丰丱串丳临丵丶丷丸丹为主丼丽举丿",
    );
    const SAMPLED_SLUGS: &str = concat!(
        "x-y x-y xc-y xpsy x-y xy-y x-y xssy x-y x-c-y xay x-y x-y xy x-r-y x-y xdegy ",
        "x-y x2y x3y x-y xmy xpy x-y x-y x1y xoy x-y x1-4y x1-2y x3-4y x-y xay xay xay ",
        "xay xay xay xaey xcy xey xey xey xey xiy xiy xiy xiy xdy xny xoy xoy xoy xoy ",
        "xoy xxy xoy xuy xuy xuy xuy xyy xthy xssy xay xay xay xay xay xay xaey xcy xey ",
        "xey xey xey xiy xiy xiy xiy xdy xny xoy xoy xoy xoy xoy x-y xoy xuy xuy xuy xuy ",
        "xyy xthy xyy xay xay xay xay xay xay xcy xcy xcy xcy xcy xcy xcy xcy xdy xdy ",
        "xdy xdy xey xey xey xey xey xey xey xey xey xey xgy xgy xgy xgy xgy xgy xgy xgy ",
        "xhy xhy xhy xhy xiy xiy xiy xiy xiy xiy xiy xiy xiy xiy xijy xijy xjy xjy xky ",
        "xky xky xly xly xly xly xly xly xl-y xl-y xly xly xny xny xny xny xny xny xny ",
        "xngy xngy xoy xoy xoy xoy xoy xoy xoey xoey xry xry xry xry xry xry xsy xsy xsy ",
        "xsy xsy xsy xsy xsy xty xty xty xty xty xty xuy xuy xuy xuy xuy xuy xuy xuy xuy ",
        "xuy xuy xuy xwy xwy xyy xyy xyy xzy xzy xzy xzy xzy xzy xsy xay xby xgy xdy xey ",
        "xzy xey xthy xiy xky xly xmy xny xksy xoy xpy xry xsy xty xuy xphy xkhy xpsy ",
        "xoy xiy xuy xay xey xey xiy xuy xay xby xgy xdy xey xzy xey xthy xiy xky xly ",
        "xmy xny xxy xoy xpy xry xsy xsy xty xuy xphy xkhy xpsy xoy xey xey xdjy xgy xey ",
        "xdzy xiy xiy xjy xljy xnjy xtshy xky xiy xuy xdzhy xay xby xvy xgy xdy xey xzhy ",
        "xzy xiy xiy xky xly xmy xny xoy xpy xry xsy xty xuy xfy xkhy xtsy xchy xshy ",
        "xshchy xy xyy xy xey xiuy xiay xay xby xvy xgy xdy xey xzhy xzy xiy xiy xky xly ",
        "xmy xny xoy xpy xry xsy xty xuy xfy xkhy xtsy xchy xshy xshchy xy xyy xy xey ",
        "xiuy xiay xey xey xdjy xgy xiey xdzy xiy xiy xjy xljy xnjy xtshy xky xiy xuy ",
        "xdzhy xay xay xiy xiy xuy xuy xey xey xoy xoy xkay xkay xkiy xkiy xkuy xkuy ",
        "xkey xkey xkoy xkoy xsay xsay xsiy xsiy xsuy xsuy xsey xsey xsoy xsoy xtay xtay ",
        "xtiy xtiy xtuy xtuy xtuy xtey xtey xtoy xtoy xnay xniy xnuy xney xnoy xhay xhay ",
        "xhay xhiy xhiy xhiy xhuy xhuy xhuy xhey xhey xhey xhoy xhoy xhoy xmay xmiy xmuy ",
        "xmey xmoy xyay xyay xyuy xyuy xyoy xyoy xray xriy xruy xrey xroy xway xway xwiy ",
        "xwey xwoy xny xuy xay xay xiy xiy xuy xuy xey xey xoy xoy xkay xkay xkiy xkiy ",
        "xkuy xkuy xkey xkey xkoy xkoy xsay xsay xsiy xsiy xsuy xsuy xsey xsey xsoy xsoy ",
        "xtay xtay xtiy xtiy xtuy xtuy xtuy xtey xtey xtoy xtoy xnay xniy xnuy xney xnoy ",
        "xhay xhay xhay xhiy xhiy xhiy xhuy xhuy xhuy xhey xhey xhey xhoy xhoy xhoy xmay ",
        "xmiy xmuy xmey xmoy xyay xyay xyuy xyuy xyoy xyoy xray xriy xruy xrey xroy xway ",
        "xway xwiy xwey xwoy xny xuy xkay xkey xway xwiy xwey xwoy xgay xgagy xgaggy ",
        "xgagsy xgany xganjy xganhy xgady xgaly xgalgy xgalmy xgalby xgalsy xgalty ",
        "xgalpy xgalhy xgamy xgaby xgabsy xgasy xgassy xgangy xgajy xgacy xgaky xgaty ",
        "xgapy xgahy xgaey xgaegy xgaeggy xgaegsy xgaeny xgaenjy xgaenhy xgaedy xgaely ",
        "xgaelgy xgaelmy xgaelby xgaelsy xgaelty xgaelpy xgaelhy xgaemy xgaeby xgaebsy ",
        "xgaesy xgaessy xgaengy xgaejy xgaecy xgaeky xgaety xgaepy xgaehy xgyay xgyagy ",
        "xgyaggy xgyagsy xgyany xgyanjy xgyanhy xgyady xyi-y xding-y xkao-y xqi-y ",
        "xshang-y xxia-y xmo-y xzhang-y xsan-y xshang-y xxia-y xji-y xbu-y xyu-y xmian-y ",
        "xgai-y xchou-y xchou-y xzhuan-y xqie-y xpi-y xshi-y xshi-y xqiu-y xbing-y xye-y ",
        "xcong-y xdong-y xsi-y xcheng-y xdiu-y xqiu-y xliang-y xdiu-y xyou-y xliang-y ",
        "xyan-y xbing-y xsang-y xgun-y xjiu-y xge-y xya-y xqiang-y xzhong-y xji-y xjie-y ",
        "xfeng-y xguan-y xchuan-y xchan-y xlin-y xzhuo-y xzhu-y xha-y xwan-y xdan-y ",
        "xwei-y xzhu-y xjing-y xli-y xju-y xpie-y ",
    );

    /// Every character of Latin-1, Latin Extended-A, basic Greek and Cyrillic, kana and the
    /// first Hangul syllables and CJK ideographs, each between `x` and `y`, agrees with
    /// Python (expected slugs generated by Prefect's environment, in the same order) — except
    /// the three in `known_transliteration_gaps`.
    #[test]
    fn matches_python_slugify_character_by_character() {
        let expected: Vec<&str> = SAMPLED_SLUGS.split_whitespace().collect();
        let chars: Vec<char> = SAMPLED.chars().collect();
        assert_eq!(chars.len(), expected.len());
        let mismatches: Vec<String> = chars
            .iter()
            .zip(&expected)
            .filter_map(|(ch, want)| {
                let got = slugify(&format!("x{ch}y"));
                (got != *want).then(|| {
                    format!(
                        "U+{:04X} {ch:?}: python {want:?}, ours {got:?}",
                        u32::from(*ch)
                    )
                })
            })
            .collect();
        assert!(
            mismatches.is_empty(),
            "{} mismatches:\n{}",
            mismatches.len(),
            mismatches.join("\n")
        );
    }

    /// Rare characters `text-unidecode` does not know (`[?]`, so `-`) but `deunicode` spells.
    #[test]
    fn known_transliteration_gaps() {
        for (ch, python, ours) in [
            ('ゕ', "x-y", "xkay"),
            ('ゖ', "x-y", "xkey"),
            ('丆', "x-y", "xhany"),
        ] {
            let got = slugify(&format!("x{ch}y"));
            assert_eq!(got, ours, "{ch:?} changed; Python gives {python:?}");
        }
    }

    #[test]
    fn matches_python_slugify_on_real_outputs() {
        let mismatches: Vec<String> = PYTHON_SLUGS
            .iter()
            .filter(|(input, want)| slugify(input) != *want)
            .map(|(input, want)| format!("{input:?}: python {want:?}, ours {:?}", slugify(input)))
            .collect();
        assert!(
            mismatches.is_empty(),
            "{} mismatches:\n{}",
            mismatches.len(),
            mismatches.join("\n")
        );
    }
}
