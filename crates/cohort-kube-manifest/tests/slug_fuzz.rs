//! Differential fuzzing of the three Kubernetes slugs against prefect-kubernetes 0.8.0's own
//! `_slugify_name`, `_slugify_label_key` and `_slugify_label_value`, run once in Python over
//! every generated string (`goldens/slugs.py`).

mod util;

use std::io::Write;
use std::process::{Command, Stdio};

use cohort_kube_manifest::{slugify_label_key, slugify_label_value, slugify_name};

const SEED: u64 = 0x6b38_735f_736c_7567;
const CASES: usize = 4000;

/// Pieces strings are made of: ASCII of every kind, what the slugs keep or strip specially, the
/// `'` and digit-comma rules, HTML entities, and letters of the scripts names are written in.
const ASCII: &str = "abcXYZ0189 \t\n!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
const SPECIAL: &[&str] = &[
    "_", "-", ".", "/", "//", "'", "1,000", "3,4,5", "__", "-.-", "._", "/.", "a/b", " ",
];
const ENTITIES: &[&str] = &[
    "&amp;",
    "&eacute;",
    "&Eacute;",
    "&#65;",
    "&#x41;",
    "&#1114112;",
    "&lt;",
    "&sup1;",
    "&copy;",
    "&nbsp;",
    "&#0;",
    "&#x;",
    "&eacute",
    "&#55296;",
];
/// Code point ranges of the blocks the transliteration is checked for, with weights.
const BLOCKS: &[(u32, u32, u32)] = &[
    (0xA0, 0x24F, 6),      // Latin-1, Latin Extended-A and B
    (0x250, 0x36F, 1),     // IPA, modifiers, combining marks
    (0x370, 0x3FF, 2),     // Greek
    (0x400, 0x52F, 2),     // Cyrillic
    (0x1E00, 0x1EFF, 2),   // Latin Extended Additional (Vietnamese)
    (0x2000, 0x27FF, 2),   // punctuation, symbols, arrows, shapes, dingbats
    (0x3000, 0x30FF, 2),   // CJK punctuation, kana
    (0x4E00, 0x9FA5, 4),   // CJK ideographs
    (0xAC00, 0xD7A3, 2),   // Hangul syllables
    (0xFF00, 0xFFEE, 1),   // fullwidth forms
    (0x1F300, 0x1F64F, 2), // emoji
];

fn piece(rng: &mut fastrand::Rng) -> String {
    match rng.u32(0..20) {
        0..=7 => {
            let ascii: Vec<char> = ASCII.chars().collect();
            ascii[rng.usize(0..ascii.len())].to_string()
        }
        8..=9 => SPECIAL[rng.usize(0..SPECIAL.len())].to_owned(),
        10 => ENTITIES[rng.usize(0..ENTITIES.len())].to_owned(),
        _ => {
            let total: u32 = BLOCKS.iter().map(|b| b.2).sum();
            let mut pick = rng.u32(0..total);
            let (first, last, _) = BLOCKS
                .iter()
                .find(|(_, _, weight)| {
                    let hit = pick < *weight;
                    pick = pick.saturating_sub(*weight);
                    hit
                })
                .expect("a block");
            char::from_u32(rng.u32(*first..=*last)).map_or_else(String::new, String::from)
        }
    }
}

fn inputs() -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut inputs: Vec<String> = vec![
        String::new(),
        "___".into(),
        "日本語".into(),
        "Ünïcødé flow — test".into(),
        "x'y\"z".into(),
        "/".into(),
        "a".repeat(300),
        format!("{}/{}", "p".repeat(300), "n".repeat(100)),
    ];
    while inputs.len() < CASES {
        // Mostly short; one in eight long, past every length cap.
        let pieces = if rng.u32(0..8) == 0 {
            rng.usize(40..400)
        } else {
            rng.usize(1..24)
        };
        inputs.push((0..pieces).map(|_| piece(&mut rng)).collect());
    }
    inputs
}

#[test]
fn slugs_match_prefect_kubernetes() {
    let inputs = inputs();
    let python = util::kubernetes_python();
    let mut child = Command::new(&python)
        .arg(util::crate_dir().join("goldens/slugs.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start goldens/slugs.py");
    let payload = serde_json::to_vec(&inputs).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "goldens/slugs.py failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let python_slugs: Vec<(Option<String>, String, String)> =
        serde_json::from_slice(&out.stdout).expect("slugs.py writes JSON");
    assert_eq!(python_slugs.len(), inputs.len());

    let mismatches: Vec<String> = inputs
        .iter()
        .zip(&python_slugs)
        .filter_map(|(input, (name, key, value))| {
            let ours = (
                slugify_name(input),
                slugify_label_key(input),
                slugify_label_value(input),
            );
            (ours != (name.clone(), key.clone(), value.clone())).then(|| {
                format!(
                    "{input:?}\n  prefect: {:?}\n  cohort:  {ours:?}",
                    (name, key, value)
                )
            })
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} inputs slug differently:\n{}",
        mismatches.len(),
        inputs.len(),
        mismatches
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
