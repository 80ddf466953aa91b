//! ASCII spellings of characters, standing in for `text-unidecode` 1.3 (python-slugify's
//! transliterator in Prefect's environment) with `deunicode` plus the corrections that make
//! them agree on every code point of the blocks names are realistically written in: Latin
//! (with Extended-A/B and Additional), Greek, Cyrillic, general punctuation and symbols,
//! enclosed alphanumerics, kana, common CJK ideographs, Hangul syllables, fullwidth forms and
//! emoji (checked one code point at a time against Python; `tests/slug_fuzz.rs` keeps checking
//! strings of them).
//!
//! Known gap: outside those blocks (CJK Extension A, Yi, historic scripts, …) the two tables
//! still differ on many code points; a name written in them can slug differently.

use unicode_normalization::UnicodeNormalization;

/// NFKD, then an ASCII spelling per character.
pub(crate) fn transliterate(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // NFKD never reorders across these (they are starters), so the text between them can be
    // decomposed piece by piece.
    let mut rest = text;
    while let Some(at) = rest.find(NEWER_THAN_PYTHON) {
        spell(&rest[..at], &mut out);
        out.push_str("[?]");
        let newer = rest[at..].chars().next().expect("found a character");
        rest = &rest[at + newer.len_utf8()..];
    }
    spell(rest, &mut out);
    out
}

fn spell(text: &str, out: &mut String) {
    for ch in text.nfkd() {
        if ch.is_ascii() {
            out.push(ch);
        } else {
            out.push_str(ascii_spelling(ch));
        }
    }
}

/// `text-unidecode`'s spelling of one non-ASCII character: `[?]` for what its table does not
/// know, nothing past U+FFFF (its table stops there: emoji vanish).
fn ascii_spelling(ch: char) -> &'static str {
    let code = u32::from(ch);
    let within = |ranges: &[(u32, u32)]| ranges.iter().any(|(a, b)| (*a..=*b).contains(&code));
    if code > 0xFFFF || within(DROPPED_RANGES) {
        return "";
    }
    if within(UNKNOWN_RANGES) || UNKNOWN_IDEOGRAPHS.contains(ch) {
        return "[?]";
    }
    if let Some((_, spelling)) = SPELLED.iter().find(|(c, _)| *c == ch) {
        return spelling;
    }
    deunicode::deunicode_char(ch).unwrap_or("[?]")
}

// The corrections: where `deunicode` spells what `text-unidecode` does not know, drops what it
// spells, or reads a character differently. Found by slugging `x<c>y` for every character of
// the blocks above with both, one code point at a time.

/// Code points `text-unidecode` spells `[?]`.
const UNKNOWN_RANGES: &[(u32, u32)] = &[
    (0x0241, 0x0242),
    (0x02EF, 0x02EF),
    (0x02F3, 0x02F3),
    (0x02FB, 0x02FE),
    (0x034F, 0x035F),
    (0x0370, 0x0373),
    (0x0376, 0x0377),
    (0x037B, 0x037D),
    (0x037F, 0x037F),
    (0x03D8, 0x03D9),
    (0x03F6, 0x03F8),
    (0x03FA, 0x03FF),
    (0x0487, 0x0487),
    (0x048A, 0x048B),
    (0x04C5, 0x04C6),
    (0x04C9, 0x04CA),
    (0x04CD, 0x04CF),
    (0x04F6, 0x04F7),
    (0x04FA, 0x052F),
    (0x0558, 0x0558),
    (0x0560, 0x0560),
    (0x0588, 0x0588),
    (0x058B, 0x058C),
    (0x058F, 0x058F),
    (0x05A2, 0x05A2),
    (0x05BA, 0x05BA),
    (0x05C7, 0x05C7),
    (0x05EF, 0x05EF),
    (0x0601, 0x0601),
    (0x0604, 0x0604),
    (0x0606, 0x060B),
    (0x0610, 0x061A),
    (0x061C, 0x061E),
    (0x0620, 0x0620),
    (0x063B, 0x063F),
    (0x0656, 0x065F),
    (0x066E, 0x066F),
    (0x06EE, 0x06EF),
    (0x06FF, 0x06FF),
    (0x0900, 0x0900),
    (0x0904, 0x0904),
    (0x093A, 0x093B),
    (0x094E, 0x094F),
    (0x0955, 0x0957),
    (0x0971, 0x097F),
    (0x1EFA, 0x1EFF),
    (0x2050, 0x2050),
    (0x2052, 0x2052),
    (0x2054, 0x2054),
    (0x2056, 0x2056),
    (0x2058, 0x2058),
    (0x205B, 0x205B),
    (0x205D, 0x205E),
    (0x2060, 0x2064),
    (0x2066, 0x2069),
    (0x209D, 0x209F),
    (0x20B0, 0x20C0),
    (0x20E4, 0x20F0),
    (0x2140, 0x2144),
    (0x214A, 0x214A),
    (0x214C, 0x214F),
    (0x2184, 0x2186),
    (0x218A, 0x218B),
    (0x2200, 0x2203),
    (0x2205, 0x2205),
    (0x2207, 0x2208),
    (0x220A, 0x220B),
    (0x220D, 0x220D),
    (0x220F, 0x2211),
    (0x221A, 0x221C),
    (0x221E, 0x221F),
    (0x2228, 0x2228),
    (0x222A, 0x222B),
    (0x222E, 0x222E),
    (0x2231, 0x2234),
    (0x2238, 0x2238),
    (0x228C, 0x228E),
    (0x2294, 0x2294),
    (0x2297, 0x2297),
    (0x2299, 0x229A),
    (0x22A0, 0x22A1),
    (0x22BA, 0x22BB),
    (0x22BD, 0x22BD),
    (0x22C1, 0x22C1),
    (0x22C3, 0x22C3),
    (0x22CE, 0x22CE),
    (0x22D3, 0x22D3),
    (0x22FF, 0x2300),
    (0x2304, 0x2304),
    (0x231A, 0x231B),
    (0x2327, 0x2328),
    (0x2336, 0x2336),
    (0x2349, 0x2349),
    (0x234C, 0x234C),
    (0x2356, 0x2358),
    (0x235E, 0x235E),
    (0x236C, 0x236C),
    (0x2371, 0x2371),
    (0x2373, 0x237B),
    (0x2396, 0x2396),
    (0x23B2, 0x23B3),
    (0x23CD, 0x23CD),
    (0x23CF, 0x23CF),
    (0x23D7, 0x23D9),
    (0x23E8, 0x23F3),
    (0x23F7, 0x23FE),
    (0x24EB, 0x24FF),
    (0x2614, 0x2618),
    (0x2673, 0x2685),
    (0x268A, 0x2697),
    (0x2699, 0x269C),
    (0x26A0, 0x26A2),
    (0x26A6, 0x26B2),
    (0x26BA, 0x26CA),
    (0x26CC, 0x26D5),
    (0x26DB, 0x26DB),
    (0x26DD, 0x26DD),
    (0x26E2, 0x26E2),
    (0x26E8, 0x26EC),
    (0x26EF, 0x26F5),
    (0x26F7, 0x26FE),
    (0x275F, 0x275F),
    (0x27B0, 0x27B0),
    (0x27BF, 0x27BF),
    (0x27C2, 0x27C2),
    (0x27C7, 0x27C7),
    (0x27CF, 0x27CF),
    (0x27D2, 0x27D2),
    (0x27D8, 0x27D9),
    (0x27F1, 0x27F1),
    (0x303C, 0x303D),
    (0x3095, 0x3096),
    (0x312D, 0x312F),
];

/// Ideographs `text-unidecode` spells `[?] `.
const UNKNOWN_IDEOGRAPHS: &str = concat!(
    "丆乊乛乥乮乽亪仩伬佦佨俧俬倿傦僲儏兯匇厁厑叾呚哖哛啹嗴嚑嚒囕囖垊垯堏堒堔塆墛壪壭",
    "夑奍娳媫孧尡屗屲屷岃崰嵵嶶嶿巕幥庒廭徔徚怽愥慐懳抣拤捤掶揻揼撶擜攚斏曢朑朥朰枤栆",
    "桞椩椬榋槡樭橺橻櫊櫦櫵欍毜毝毶氞汣泹洜涥渏溄溊溋滧潈潉澛澝濏濸瀭瀮灜炞炿烥烪烮焑",
    "焒焹焽焾焿煀煶煷熖熴燝燞爎爘爠爦爳牗犞獇珯琒琻璍璤璴癦癷瞣砛砽硓硘硛硳碷磗磮礂礡",
    "礢祍禙禣稥穒穯窧窽篐簯籂籎粀粌粩粬糬绬罀罖翶耂聁聓聣脌舤舿艈艔茐茒茾荢萞萟萡萣蒊",
    "蒏蓞蓤蕱藔藲藵蘕虅虲蝊螁螩蟵蠴衐裇襨覄謃謢豮贌贘趰踎躼辪遤邜酜鈫鋴錿鍂鍅鎆鎼鎽鎾",
    "鏯鏱鏲鐢鐣鑦鑧闎闧隡霗霻靍韕韟飊駇鮘鶑麶",
);

/// What `text-unidecode` drops: the combining semi-voiced mark (from NFKD of パ), the katakana
/// middle dot, tone letters, letterlike symbols, …
const DROPPED_RANGES: &[(u32, u32)] = &[
    (0x02E5, 0x02EB),
    (0x0483, 0x0483),
    (0x05BE, 0x05BE),
    (0x05C1, 0x05C1),
    (0x05C4, 0x05C4),
    (0x0653, 0x0653),
    (0x0670, 0x0670),
    (0x0674, 0x0674),
    (0x06D0, 0x06D1),
    (0x1120, 0x1120),
    (0x2104, 0x2104),
    (0x2108, 0x2108),
    (0x2114, 0x2114),
    (0x2117, 0x2118),
    (0x211E, 0x211F),
    (0x2123, 0x2123),
    (0x2125, 0x2125),
    (0x2127, 0x2127),
    (0x2129, 0x2129),
    (0x212E, 0x212E),
    (0x2132, 0x2132),
    (0x213A, 0x213A),
    (0x2400, 0x2426),
    (0x2440, 0x2445),
    (0x2447, 0x244A),
    (0x2600, 0x2613),
    (0x2619, 0x2671),
    (0x2701, 0x275A),
    (0x275D, 0x275E),
    (0x2761, 0x27AF),
    (0x27B1, 0x27BE),
    (0x3035, 0x3035),
    (0x303E, 0x303F),
    (0x309A, 0x309A),
    (0x30FB, 0x30FB),
];

/// Different spellings.
const SPELLED: &[(char, &str)] = &[
    ('\u{25F4}', "#"),
    ('\u{25F5}', "#"),
    ('\u{25F6}', "#"),
    ('\u{25F7}', "#"),
    ('么', "Yao "),
    ('什', "Shi "),
    ('价', "Jie "),
    ('旅', "Lu "),
    ('术', "Zhu "),
];

/// Assigned after Unicode 14 (the tables of Python 3.11, the Python of Prefect's images) with a
/// compatibility decomposition: Python leaves them whole and `text-unidecode` does not know
/// them, where a newer NFKD would spell them out.
const NEWER_THAN_PYTHON: &[char] = &[
    '\u{0558}', '\u{058B}', '\u{058C}', '\u{209D}', '\u{209E}', '\u{209F}', '\u{A7F1}',
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrections_win_over_deunicode() {
        assert_eq!(ascii_spelling('什'), "Shi ");
        assert_eq!(ascii_spelling('丆'), "[?]");
        assert_eq!(ascii_spelling('\u{0370}'), "[?]");
        assert_eq!(ascii_spelling('℗'), "");
        assert_eq!(ascii_spelling('😀'), "");
        assert_eq!(ascii_spelling('日'), "Ri ");
        assert_eq!(transliterate("パン"), "han");
        assert_eq!(transliterate("a\u{209D}b"), "a[?]b");
    }
}
