//! What every fault trial reports: its [`Figures`] (runs and their final states, worker events
//! expected and stored, duplicates, orphaned processes), the checks behind them, and the small
//! tools the trials share — one trial at a time ([`serial`]), a seedable RNG for random fault
//! timing ([`Rng`]).

// Each test binary that pulls in `util` uses only part of this API.
#![allow(dead_code)]
// Black-box trials on real processes and /proc: wall-clock time is the point.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{slugify, summarize_events, PrefectServer};

/// Event names the worker emits (the worker and runner event spec).
pub const STARTED: &str = "prefect.worker.started";
pub const STOPPED: &str = "prefect.worker.stopped";
pub const SUBMITTED: &str = "prefect.worker.submitted-flow-run";
pub const EXECUTED: &str = "prefect.worker.executed-flow-run";

/// The label of the flow-run related resource of `executed-flow-run` carrying the exit code.
pub const STATUS_CODE_LABEL: &str = "prefect.infrastructure.status-code";

static SERIAL: Mutex<()> = Mutex::new(());

/// Held for the whole of a trial: trials stop the server, kill processes and read every event
/// of a worker, so no two may overlap (whatever `--test-threads` says). A trial that panicked
/// does not poison the others.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The figures a trial prints and asserts on.
#[derive(Debug, Clone)]
pub struct Figures {
    /// e.g. `trial 1` or `soak 3 trial 4`.
    pub label: String,
    /// Flow runs created by the trial.
    pub runs: usize,
    /// Final (or last seen) state type → number of runs.
    pub states: BTreeMap<String, usize>,
    pub events: EventTally,
    /// Live processes still carrying one of the trial's `PREFECT__FLOW_RUN_ID`s after the
    /// trial ([`orphans`]).
    pub orphans: Vec<String>,
    /// Trial-specific figures (fault timing, injected failures, …), printed in order.
    pub notes: Vec<(String, String)>,
    /// Wall time of the trial.
    pub wall: Duration,
}

impl Figures {
    pub fn new(label: &str) -> Figures {
        Figures {
            label: label.to_owned(),
            runs: 0,
            states: BTreeMap::new(),
            events: EventTally::default(),
            orphans: Vec::new(),
            notes: Vec::new(),
            wall: Duration::ZERO,
        }
    }

    pub fn note(&mut self, key: &str, value: impl fmt::Display) {
        self.notes.push((key.to_owned(), value.to_string()));
    }

    /// Runs whose state is `state_type` (e.g. `COMPLETED`).
    pub fn in_state(&self, state_type: &str) -> usize {
        self.states.get(state_type).copied().unwrap_or(0)
    }

    /// Print the one-line summary (on stderr, so `cargo test` shows it with `--nocapture`).
    pub fn print(&self) {
        eprintln!("{self}");
    }

    /// No event missing, duplicated or unexpected; no orphaned process. Panics with the
    /// figures and `context` (e.g. the worker's output) otherwise.
    pub fn assert_clean(&self, context: &str) {
        let t = &self.events;
        assert!(
            t.missing.is_empty()
                && t.duplicate_ids == 0
                && t.duplicate_pairs == 0
                && t.unexpected.is_empty()
                && self.orphans.is_empty(),
            "{self}\nmissing events: {:?}\nduplicated (event, flow run): {:?}\nunexpected events:\n{}\
             orphaned processes: {:?}\n{context}",
            t.missing,
            t.duplicated,
            t.unexpected.join(""),
            self.orphans,
        );
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.events;
        write!(f, "[{}] runs {}", self.label, self.runs)?;
        for (state, n) in &self.states {
            write!(f, ", {} {n}", state.to_lowercase())?;
        }
        write!(
            f,
            ", events expected {}, stored {}, missing {}, duplicates {} by id / {} by (event, run), \
             unexpected {}, orphans {}",
            t.expected,
            t.stored,
            t.missing.len(),
            t.duplicate_ids,
            t.duplicate_pairs,
            t.unexpected.len(),
            self.orphans.len()
        )?;
        for (k, v) in &self.notes {
            write!(f, ", {k} {v}")?;
        }
        write!(f, ", wall {:.1} s", self.wall.as_secs_f64())
    }
}

/// Worker events read back from the server, against the ones expected.
#[derive(Debug, Clone, Default)]
pub struct EventTally {
    /// Distinct (event, flow run) pairs expected.
    pub expected: usize,
    /// Events stored for expected pairs (duplicates included).
    pub stored: usize,
    /// Expected pairs with no stored event, as `event run`.
    pub missing: Vec<String>,
    /// Events stored more than once under the same id (extra copies).
    pub duplicate_ids: usize,
    /// Extra events for an expected pair (a pair stored `n` times counts `n - 1`).
    pub duplicate_pairs: usize,
    /// The pairs stored more than once.
    pub duplicated: Vec<String>,
    /// Stored events of the worker that no expectation covers, one summary line each.
    pub unexpected: Vec<String>,
    /// The stored events of each expected pair: lets a trial inspect one (e.g. its labels).
    pub by_pair: HashMap<(String, Option<String>), Vec<Value>>,
}

impl EventTally {
    /// The stored events of `(event, run)`.
    pub fn of(&self, event: &str, run: Option<&str>) -> &[Value] {
        self.by_pair
            .get(&(event.to_owned(), run.map(str::to_owned)))
            .map_or(&[], Vec::as_slice)
    }
}

/// The flow run an event is about: its related resource with role `flow-run`.
pub fn flow_run_of(event: &Value) -> Option<String> {
    event["related"].as_array()?.iter().find_map(|r| {
        (r["prefect.resource.role"] == "flow-run")
            .then(|| r["prefect.resource.id"].as_str())
            .flatten()
            .and_then(|id| id.strip_prefix("prefect.flow-run."))
            .map(str::to_owned)
    })
}

/// The label `key` of the flow-run related resource of `event`.
pub fn flow_run_label(event: &Value, key: &str) -> Option<String> {
    event["related"].as_array()?.iter().find_map(|r| {
        (r["prefect.resource.role"] == "flow-run")
            .then(|| r[key].as_str().map(str::to_owned))
            .flatten()
    })
}

/// Every event of the worker named `worker_name` (resource `prefect.worker.<type>.<slug>`,
/// process or docker; the names are unique), oldest first.
pub fn worker_events(s: &PrefectServer, worker_name: &str) -> Vec<Value> {
    let slug = slugify(worker_name);
    s.read_events(json!({
        "resource": {"id": [
            format!("prefect.worker.process.{slug}"),
            format!("prefect.worker.docker.{slug}"),
        ]},
    }))
}

/// Tally `events` against `expected` (event name, flow run id or `None` for the worker's own
/// `started`/`stopped`).
pub fn tally(events: &[Value], expected: &[(&str, Option<&str>)]) -> EventTally {
    let expected: BTreeSet<(String, Option<String>)> = expected
        .iter()
        .map(|(e, r)| ((*e).to_owned(), r.map(str::to_owned)))
        .collect();
    let mut t = EventTally {
        expected: expected.len(),
        ..EventTally::default()
    };
    let mut ids = BTreeSet::new();
    for event in events {
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        if !ids.insert(id) {
            t.duplicate_ids += 1;
        }
        let pair = (
            event["event"].as_str().unwrap_or_default().to_owned(),
            flow_run_of(event),
        );
        if expected.contains(&pair) {
            t.stored += 1;
            t.by_pair.entry(pair).or_default().push(event.clone());
        } else {
            t.unexpected
                .push(summarize_events(std::slice::from_ref(event)));
        }
    }
    for pair in &expected {
        let name = format!("{} {}", pair.0, pair.1.as_deref().unwrap_or("-"));
        match t.by_pair.get(pair).map_or(0, Vec::len) {
            0 => t.missing.push(name),
            1 => {}
            n => {
                t.duplicate_pairs += n - 1;
                t.duplicated.push(format!("{name} ×{n}"));
            }
        }
    }
    t
}

/// Read the worker's events until every expected one is stored (or `timeout`), then once more
/// after `settle` so a late duplicate is counted too.
pub fn collect_events(
    s: &PrefectServer,
    worker_name: &str,
    expected: &[(&str, Option<&str>)],
    timeout: Duration,
    settle: Duration,
) -> EventTally {
    let deadline = Instant::now() + timeout;
    loop {
        let t = tally(&worker_events(s, worker_name), expected);
        if t.missing.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(settle);
    tally(&worker_events(s, worker_name), expected)
}

/// Final (or current) state type of each run, counted.
pub fn state_counts(s: &PrefectServer, run_ids: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for id in run_ids {
        let run = s.read_flow_run(id);
        let state = run["state"]["type"].as_str().unwrap_or("NONE").to_owned();
        *counts.entry(state).or_insert(0) += 1;
    }
    counts
}

/// Live processes (zombies excluded) whose environment carries `PREFECT__FLOW_RUN_ID` of one
/// of `run_ids`, as `pid run-id cmdline`. Reads `/proc/<pid>/environ`, which holds the
/// environment a process was started with: exactly what a flow process (and anything it
/// started) inherits from the worker.
pub fn orphans(run_ids: &[String]) -> Vec<String> {
    let wanted: BTreeSet<&str> = run_ids.iter().map(String::as_str).collect();
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        panic!("cannot read /proc: the orphan check needs Linux procfs");
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(environ) = fs::read(entry.path().join("environ")) else {
            continue; // gone meanwhile, or not ours
        };
        let run = environ.split(|b| *b == 0).find_map(|var| {
            var.strip_prefix(b"PREFECT__FLOW_RUN_ID=")
                .and_then(|v| std::str::from_utf8(v).ok())
                .filter(|v| wanted.contains(v))
        });
        let Some(run) = run else { continue };
        if process_state(pid) == Some('Z') || process_state(pid).is_none() {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        found.push(format!("{pid} {run} {}", cmdline.trim_end()));
    }
    found
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, …); `None` if the process is gone.
fn process_state(pid: &str) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S …`: comm may contain spaces and parentheses, so split after the last `)`.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Poll [`orphans`] until none is left or `timeout` passes (a process killed a moment ago may
/// not have been reaped yet); returns what is left.
pub fn orphans_after(run_ids: &[String], timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = orphans(run_ids);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// splitmix64: a tiny seedable RNG for fault timing; a failing soak round prints its seed so it
/// can be replayed (`COHORT_SOAK_SEED`).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seed from `$COHORT_SOAK_SEED` if set, else a fresh random one.
    pub fn from_env_or_random() -> (Rng, u64) {
        let seed = match std::env::var("COHORT_SOAK_SEED") {
            Ok(s) if !s.is_empty() => s
                .parse()
                .unwrap_or_else(|e| panic!("COHORT_SOAK_SEED={s}: not a u64: {e}")),
            _ => {
                let bytes = *uuid::Uuid::new_v4().as_bytes();
                u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
            }
        };
        (Rng(seed), seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "Rng::range({lo}, {hi})");
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform duration in `lo..=hi`, millisecond steps.
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        let ms = self.range(
            u64::try_from(lo.as_millis()).expect("ms fit"),
            u64::try_from(hi.as_millis()).expect("ms fit"),
        );
        Duration::from_millis(ms)
    }
}
